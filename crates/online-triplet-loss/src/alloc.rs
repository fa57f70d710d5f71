//! Host buffers whose allocation can fail. A `Vec` or map that cannot grow
//! aborts the process (`handle_alloc_error`); these give
//! [`Error::OutOfMemory`] instead, which reaches Python as an exception, as
//! a tensor that cannot be allocated reaches it as libtorch's error.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use crate::Error;

fn out_of_memory<T>(len: usize) -> Error {
    Error::OutOfMemory {
        bytes: len.saturating_mul(std::mem::size_of::<T>()),
    }
}

/// An empty `Vec` with room for `len` elements.
pub(crate) fn with_capacity<T>(len: usize) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| out_of_memory::<T>(len))?;
    Ok(v)
}

/// `vec![value; len]`.
pub(crate) fn filled<T: Clone>(len: usize, value: T) -> Result<Vec<T>, Error> {
    let mut v = with_capacity(len)?;
    v.resize(len, value);
    Ok(v)
}

/// Room for `additional` more elements in `v`, growing it as `push` would.
pub(crate) fn reserve<T>(v: &mut Vec<T>, additional: usize) -> Result<(), Error> {
    v.try_reserve(additional)
        .map_err(|_| out_of_memory::<T>(v.len().saturating_add(additional)))
}

/// `v.push(value)`.
pub(crate) fn push<T>(v: &mut Vec<T>, value: T) -> Result<(), Error> {
    reserve(v, 1)?;
    v.push(value);
    Ok(())
}

/// `v.extend(items)`, for items that know their number.
pub(crate) fn extend<T>(
    v: &mut Vec<T>,
    items: impl IntoIterator<Item = T, IntoIter: ExactSizeIterator>,
) -> Result<(), Error> {
    let items = items.into_iter();
    reserve(v, items.len())?;
    v.extend(items);
    Ok(())
}

/// Room for `additional` more entries in `m`.
pub(crate) fn reserve_map<K: Eq + Hash, V, S: BuildHasher>(
    m: &mut HashMap<K, V, S>,
    additional: usize,
) -> Result<(), Error> {
    m.try_reserve(additional)
        .map_err(|_| out_of_memory::<(K, V)>(m.len().saturating_add(additional)))
}

/// An empty map with room for `len` entries.
pub(crate) fn map_with_capacity<K: Eq + Hash, V, S: BuildHasher + Default>(
    len: usize,
) -> Result<HashMap<K, V, S>, Error> {
    let mut m = HashMap::with_hasher(S::default());
    m.try_reserve(len)
        .map_err(|_| out_of_memory::<(K, V)>(len))?;
    Ok(m)
}

/// The elements of `t`, flattened, as `Vec::<T>::try_from(t)` (whose buffer
/// cannot fail).
pub(crate) fn to_vec<T: tch::kind::Element + Clone + Default>(
    t: &tch::Tensor,
) -> Result<Vec<T>, Error> {
    let t = t
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(T::KIND)?
        .f_contiguous()?;
    let numel = t.numel();
    let mut v = filled(numel, T::default())?;
    t.f_copy_data(&mut v, numel)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_that_cannot_be_had_is_an_error() {
        let len = usize::MAX / 4;
        let want = Error::OutOfMemory {
            bytes: len.saturating_mul(8),
        };
        assert_eq!(with_capacity::<u64>(len).unwrap_err(), want);
        assert_eq!(filled(len, 0u64).unwrap_err(), want);
        let mut v = vec![1u64];
        assert!(reserve(&mut v, len).is_err());
        assert!(extend(&mut v, std::iter::repeat_n(0, len)).is_err());
        assert_eq!(v, [1]);
        let map = map_with_capacity::<u64, u64, std::hash::RandomState>(len);
        assert!(matches!(map, Err(Error::OutOfMemory { .. })));
        assert_eq!(
            want.to_string(),
            format!(
                "out of host memory: a buffer of at least {} bytes could not be allocated",
                usize::MAX
            )
        );
    }

    #[test]
    fn buffers_hold_what_vec_would() {
        let mut v = filled(3, 7i64).unwrap();
        push(&mut v, 8).unwrap();
        extend(&mut v, [9, 10]).unwrap();
        assert_eq!(v, [7, 7, 7, 8, 9, 10]);
        let t = tch::Tensor::from_slice(&[1.5f32, 2.5, -0.0]).view([3, 1]);
        assert_eq!(to_vec::<f64>(&t).unwrap(), [1.5, 2.5, -0.0]);
    }
}
