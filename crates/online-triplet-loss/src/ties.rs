//! Identical embeddings. A distance matrix computed as ‖x‖² + ‖y‖² − 2x·y
//! rounds each entry through a matrix product whose accumulation order
//! depends on the entry's position, so two identical references can be one
//! ulp apart from the same anchor, and an embedding is not exactly at
//! distance 0 from its copy. Mining compares distances, so it first makes
//! the columns of identical references equal and the distance between
//! identical embeddings exactly 0: ties then resolve by the documented rules.

use tch::{Device, Kind, Tensor};

use crate::alloc;
use crate::hash::FastMap;
use crate::mining::Kernel;
use crate::Error;

/// For each row of `parts` taken in order (as if concatenated), the index
/// of the first row with the same values (rows differing only in the sign
/// of zeros count as the same; a row holding NaN has no copy), and whether
/// any row has an earlier copy (always `true` off the CPU, where finding out
/// would synchronise, and with the portable kernel). On the CPU the rows are
/// hashed where they lie: they must be the call's own tensors
/// ([`crate::distance::Side::tie_rows`]), which no other thread writes
/// meanwhile (a part that is misaligned or a negated view is copied first).
fn first_copies(parts: &[&Tensor], kernel: Kernel) -> Result<(Tensor, bool), Error> {
    let kinds = parts
        .iter()
        .map(|p| p.f_kind())
        .collect::<Result<Vec<_>, _>>()?;
    let cpu = parts.iter().all(|p| p.device() == Device::Cpu);
    let one_kind = kinds.windows(2).all(|k| k[0] == k[1]);
    // The slices of `hashed` are made here, from the dtype matched exactly.
    match (kernel, cpu && one_kind, kinds.first()) {
        (Kernel::Auto, true, Some(Kind::Float)) => hashed::<u32>(parts),
        (Kernel::Auto, true, Some(Kind::Double)) => hashed::<u64>(parts),
        _ => {
            // The concatenation is a new tensor: −0 becomes 0 in place.
            let mut x = Tensor::f_cat(parts, 0)?.f_detach()?;
            let _ = x.f_add_scalar_(0.0)?;
            Ok((sorted(&x, x.size()[0])?, true))
        }
    }
}

/// The bit pattern of a float32 (`u32`) or float64 (`u64`).
trait Bits: Copy {
    /// The pattern as a word, −0 as 0 (they compare equal).
    fn word(self) -> u64;
    fn is_nan(self) -> bool;
}

impl Bits for u32 {
    fn word(self) -> u64 {
        if self == 1 << 31 {
            0
        } else {
            u64::from(self)
        }
    }
    fn is_nan(self) -> bool {
        self & !(1 << 31) > 0x7f80_0000
    }
}

impl Bits for u64 {
    fn word(self) -> u64 {
        if self == 1 << 63 {
            0
        } else {
            self
        }
    }
    fn is_nan(self) -> bool {
        self & !(1 << 63) > 0x7ff0_0000_0000_0000
    }
}

/// A row of floats' bit patterns, equal to another of the same values.
struct Row<'a, T>(&'a [T]);

impl<T: Bits> std::hash::Hash for Row<'_, T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for &w in self.0 {
            state.write_u64(w.word());
        }
    }
}

impl<T: Bits> PartialEq for Row<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(other.0)
                .all(|(&a, &b)| a.word() == b.word())
    }
}

impl<T: Bits> Eq for Row<'_, T> {}

/// [`first_copies`] by hashing the rows' bit patterns, of CPU tensors of
/// 4- or 8-byte floats, as `T` says.
fn hashed<T: Bits>(parts: &[&Tensor]) -> Result<(Tensor, bool), Error> {
    let own = |p: &Tensor| -> Result<Tensor, Error> {
        let p = p.f_detach()?.f_contiguous()?;
        let aligned = (p.data_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
        Ok(match aligned && !p.f_is_neg()? {
            true => p,
            false => p.f_add_scalar(0.0)?,
        })
    };
    let parts = parts
        .iter()
        .map(|p| own(p))
        .collect::<Result<Vec<_>, _>>()?;
    let n: i64 = parts.iter().map(|p| p.size()[0]).sum();
    let mut seen: FastMap<Row<T>, i64> = alloc::map_with_capacity(n as usize)?;
    let mut copies = false;
    let mut first: Vec<i64> = alloc::with_capacity(n as usize)?;
    for part in &parts {
        let (rows, numel) = (part.size()[0] as usize, part.numel());
        if rows == 0 {
            continue;
        }
        let data: &[T] = if numel == 0 {
            &[]
        } else {
            // SAFETY: `part` is a contiguous, aligned CPU tensor of floats of
            // T's size (the caller matched its dtype), not a negated view,
            // that no other thread writes (the call's own), and it outlives
            // the slice.
            unsafe { std::slice::from_raw_parts(part.data_ptr() as *const T, numel) }
        };
        let width = numel / rows;
        for r in 0..rows {
            let i = first.len() as i64;
            let row = &data[r * width..(r + 1) * width];
            if row.iter().any(|w| w.is_nan()) {
                first.push(i);
                continue;
            }
            let f = *seen.entry(Row(row)).or_insert(i);
            copies |= f != i;
            first.push(f);
        }
    }
    Ok((Tensor::f_from_slice(&first)?, copies))
}

/// Odd multipliers: of a row's columns (the golden ratio's), and of the
/// mixing (splitmix64's).
const COLUMN: i64 = 0x9e37_79b9_7f4a_7c15_u64 as i64;
const MIX_1: i64 = 0xbf58_476d_1ce4_e5b9_u64 as i64;
const MIX_2: i64 = 0x94d0_49bb_1331_11eb_u64 as i64;

/// The row keys take this many int64 words at a time (32 MiB), a block of
/// columns: the mixing needs two such temporaries.
const KEY_BLOCK_ELEMENTS: i64 = 1 << 22;

/// splitmix64's finaliser, a bijection of 64-bit words (wrapping products),
/// in place; `>>` shifts int64 arithmetically, so the sign is masked off.
/// Each product follows a shift that brings the high bits down: a product
/// first would send a flip of the top bit (a float64's sign) to a flip of
/// the top bit, whose sum over the columns is linear, so rows differing in
/// the signs of two entries would share a key half the time.
fn mix_(z: &mut Tensor) -> Result<(), Error> {
    for (s, product) in [(30, Some(MIX_1)), (27, Some(MIX_2)), (31, None)] {
        let mut high = z.f_bitwise_right_shift_tensor_scalar(s)?;
        let _ = high.f_bitwise_and_((1i64 << (64 - s)) - 1)?;
        let _ = z.f_bitwise_xor_tensor_(&high)?;
        if let Some(product) = product {
            let _ = z.f_mul_scalar_(product)?;
        }
    }
    Ok(())
}

/// A 64-bit key per row: the sum (wrapping) over its entries of the mixed
/// word of the entry's bit pattern and its column, taken a block of about
/// `block_elements` entries at a time. Rows that differ in one entry have
/// different keys; the column makes rows that are permutations of each other
/// (one-hot rows, say) differ too.
fn key(x: &Tensor, block_elements: i64) -> Result<Tensor, Error> {
    let (n, width) = (x.size()[0], x.size()[1]);
    let opts = (Kind::Int64, x.device());
    let step = (block_elements / n.max(1)).clamp(1, width.max(1));
    let mut key: Option<Tensor> = None;
    for start in (0..width).step_by(step as usize) {
        let len = step.min(width - start);
        let block = x.f_narrow(1, start, len)?;
        let bits = match x.f_kind()? {
            Kind::Double => block.f_view_dtype(Kind::Int64)?,
            Kind::Float => block.f_view_dtype(Kind::Int)?,
            Kind::Half | Kind::BFloat16 => block.f_view_dtype(Kind::Int16)?,
            kind => {
                return Err(Error::Torch(format!(
                    "internal error: identical rows of {kind:?} embeddings"
                )))
            }
        };
        // A copy, also of float64's bits, which are x's own storage.
        let mut word = bits.f_to_dtype(Kind::Int64, false, true)?;
        let column = Tensor::f_arange_start(start, start + len, opts)?.f_mul_scalar_(COLUMN)?;
        let _ = word.f_add_(&column.f_unsqueeze(0)?)?;
        mix_(&mut word)?;
        let sum = word.f_sum_dim_intlist(1, false, Kind::Int64)?;
        key = Some(match key {
            Some(mut key) => {
                let _ = key.f_add_(&sum)?;
                key
            }
            None => sum,
        });
    }
    match key {
        Some(key) => Ok(key),
        None => Ok(Tensor::f_zeros([n], opts)?),
    }
}

/// First copies with fixed shapes and a constant number of operations per
/// block of columns, for any device. Each row gets a 64-bit [`key`]; in a
/// stable sort by key, the first row with a row's key is the lowest such
/// row, and the row is a copy of it when it equals it. Rows that are not
/// chosen to collide share a key with probability about 2^-64 a pair, but
/// the keys are sums over the entries, so colliding rows can be constructed
/// on purpose. A row whose key's first row differs from it is counted as
/// having no copy: a false copy is never made, and a missed one only leaves
/// the distances of identical embeddings as libtorch rounds them (about the
/// square root of the rounding, for Euclidean distances), which can move a
/// tie between them.
fn sorted(x: &Tensor, n: i64) -> Result<Tensor, Error> {
    let key = key(x, KEY_BLOCK_ELEMENTS)?;
    let (by_key, order) = key.f_sort_stable(true, 0, false)?;
    let first = order.f_index_select(
        0,
        &key.f_searchsorted(&by_key, false, false, "left", None::<Tensor>)?,
    )?;
    let copy = x
        .f_index_select(0, &first)?
        .f_eq_tensor(x)?
        .f_all_dim(1, false)?;
    Ok(first.f_where_self(&copy, &Tensor::f_arange(n, (Kind::Int64, x.device()))?)?)
}

/// What mining needs to treat identical embeddings exactly.
pub(crate) struct Ties {
    /// For each reference, the first identical reference.
    columns: Tensor,
    /// For each anchor, an id equal to `columns[j]` exactly when anchor and
    /// reference j are identical; ids of anchors without a copy among the
    /// references match no column.
    rows: Tensor,
}

impl Ties {
    /// `anchor_offset = Some(k)` when anchor i is reference k + i; `same`
    /// when anchors and references are the same tensor. Returns `None` when
    /// no two embeddings are identical.
    pub(crate) fn find(
        x: &Tensor,
        y: &Tensor,
        anchor_offset: Option<i64>,
        same: bool,
        kernel: Kernel,
    ) -> Result<Option<Ties>, Error> {
        let (n, m) = (x.size()[0], y.size()[0]);
        let k = anchor_offset.unwrap_or(0);
        if same {
            let (columns, copies) = first_copies(&[y], kernel)?;
            let rows = columns.f_narrow(0, k, n)?;
            return Ok(copies.then_some(Ties { columns, rows }));
        }
        // Anchors that are their references k + i share their ties, found
        // among the references alone (on the CPU, where that is known
        // without waiting for a device): an anchor is then no copy of
        // anything to count, and a batch of distinct embeddings has none.
        // Anchors that differ from their rows there (a stale entry of a
        // memory bank, say) have ties of their own values.
        let (cpu, native) = (x.device() == Device::Cpu, kernel == Kernel::Auto);
        if anchor_offset.is_some() && cpu && native {
            let own = y.f_narrow(0, k, n)?.f_eq_tensor(x)?.f_all()?;
            if own.f_int64_value(&[])? != 0 {
                let (columns, copies) = first_copies(&[y], kernel)?;
                let rows = columns.f_narrow(0, k, n)?;
                return Ok(copies.then_some(Ties { columns, rows }));
            }
        }
        // References first, so a reference's first copy is a reference,
        // and an anchor without an identical reference gets an id ≥ m.
        let (ids, copies) = first_copies(&[y, x], kernel)?;
        if !copies {
            return Ok(None);
        }
        Ok(Some(Ties {
            columns: ids.f_narrow(0, 0, m)?,
            rows: ids.f_narrow(0, m, n)?,
        }))
    }

    /// The same ties with the references narrowed to the first `count`
    /// rows, for anchors found among all of them ([`Ties::find`] with
    /// `same`): the first copy of one of those rows is one of them too.
    pub(crate) fn leading_columns(self, count: i64) -> Result<Ties, Error> {
        Ok(Ties {
            columns: self.columns.f_narrow(0, 0, count)?,
            rows: self.rows,
        })
    }

    /// Rewrites the distances of anchors `start..start + d.size()[0]`.
    pub(crate) fn apply(&self, d: &Tensor, start: i64) -> Result<Tensor, Error> {
        let mut d = d.f_index_select(1, &self.columns)?;
        let _ = d.f_masked_fill_(&self.identical(start, d.size()[0])?, 0.0)?;
        Ok(d)
    }

    /// [`Ties::apply`] to the distances `d` of anchors `anchors`, `(m,)`, to
    /// every reference; also returns which pairs are identical.
    pub(crate) fn applied_to_rows(
        &self,
        d: &Tensor,
        anchors: &Tensor,
    ) -> Result<(Tensor, Tensor), Error> {
        let mut d = d.f_index_select(1, &self.columns)?;
        let identical = self
            .rows
            .f_index_select(0, anchors)?
            .f_unsqueeze(1)?
            .f_eq_tensor(&self.columns.f_unsqueeze(0)?)?;
        let _ = d.f_masked_fill_(&identical, 0.0)?;
        Ok((d, identical))
    }

    /// Whether anchor `anchors[i]` and reference `references[i][j]` are
    /// identical, in the shape of `references`.
    pub(crate) fn identical_pairs(
        &self,
        anchors: &Tensor,
        references: &Tensor,
    ) -> Result<Tensor, Error> {
        let columns = self
            .columns
            .f_index_select(0, &references.f_reshape([-1])?)?
            .f_view_as(references)?;
        Ok(self
            .rows
            .f_index_select(0, anchors)?
            .f_unsqueeze(1)?
            .f_eq_tensor(&columns)?)
    }

    /// Whether anchor `start + i` and reference j are identical, `(len, m)`.
    pub(crate) fn identical(&self, start: i64, len: i64) -> Result<Tensor, Error> {
        Ok(self
            .rows
            .f_narrow(0, start, len)?
            .f_unsqueeze(1)?
            .f_eq_tensor(&self.columns.f_unsqueeze(0)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For each row, the first row equal to it entry by entry (NaN equals
    /// nothing, −0 equals 0), by brute force in float64.
    fn brute_force(x: &Tensor) -> Vec<i64> {
        let rows = Vec::<Vec<f64>>::try_from(x.to_kind(Kind::Double)).unwrap();
        (0..rows.len())
            .map(|i| (0..=i).find(|&j| rows[j] == rows[i]).unwrap_or(i) as i64)
            .collect()
    }

    fn portable(x: &Tensor) -> Vec<i64> {
        let (first, copies) = first_copies(&[x], Kernel::Portable).unwrap();
        assert!(copies, "the portable kernel cannot know there are none");
        Vec::<i64>::try_from(&first).unwrap()
    }

    /// Random rows drawn from a few distinct ones, so most have copies.
    fn with_copies(seed: i64, n: i64, distinct: i64, d: i64, kind: Kind) -> Tensor {
        tch::manual_seed(seed);
        let base = Tensor::randn([distinct, d], (kind, Device::Cpu));
        base.index_select(
            0,
            &Tensor::randint(distinct, [n], (Kind::Int64, Device::Cpu)),
        )
    }

    #[test]
    fn portable_first_copies_match_brute_force_in_every_dtype() {
        for kind in [Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16] {
            for (seed, n, distinct, d) in [
                (0, 50, 7, 3),
                (1, 200, 199, 16),
                (2, 64, 1, 5),
                (3, 1, 1, 4),
            ] {
                let x = with_copies(seed, n, distinct, d, kind);
                assert_eq!(portable(&x), brute_force(&x), "{kind:?} seed {seed}");
            }
        }
    }

    #[test]
    fn portable_first_copies_of_signed_zeros_nan_and_empty_rows() {
        let x = Tensor::from_slice(&[
            0.0f32,
            1.0,
            -0.0,
            1.0,
            f32::NAN,
            2.0,
            f32::NAN,
            2.0,
            0.0,
            -1.0,
            -0.0,
            1.0,
        ])
        .view([6, 2]);
        // Rows 0, 1 and 5 are equal (signed zeros), NaN rows equal nothing.
        assert_eq!(portable(&x), vec![0, 0, 2, 3, 4, 0]);
        assert_eq!(portable(&x), brute_force(&x));
        let empty_rows = Tensor::zeros([4, 0], (Kind::Float, Device::Cpu));
        assert_eq!(portable(&empty_rows), vec![0, 0, 0, 0]);
        let no_rows = Tensor::zeros([0, 3], (Kind::Float, Device::Cpu));
        assert_eq!(portable(&no_rows), Vec::<i64>::new());
    }

    /// Rows of ±1 (every sign pattern of 10 entries), of small integers, and
    /// one-hot rows: rows that differ only in signs, in a few top bits, or
    /// are permutations of each other.
    fn structured_rows(kind: Kind) -> Vec<Tensor> {
        let opts = (kind, Device::Cpu);
        let signs = Tensor::arange(1024, (Kind::Int64, Device::Cpu))
            .unsqueeze(1)
            .bitwise_right_shift(&Tensor::arange(10, (Kind::Int64, Device::Cpu)))
            .bitwise_and(1)
            .to_kind(kind)
            .f_mul_scalar(2.0)
            .unwrap()
            .f_sub_scalar(1.0)
            .unwrap();
        tch::manual_seed(5);
        let small = Tensor::randint(3, [400, 6], opts);
        let one_hot = Tensor::eye(8, opts).repeat([3, 1]) * 2.0;
        vec![signs, small, one_hot]
    }

    #[test]
    fn distinct_structured_rows_have_distinct_keys() {
        for kind in [Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16] {
            for x in structured_rows(kind) {
                let first = brute_force(&x);
                let keys = Vec::<i64>::try_from(key(&x, i64::MAX).unwrap()).unwrap();
                let mut seen = std::collections::HashMap::new();
                for (i, (&k, &f)) in keys.iter().zip(&first).enumerate() {
                    let row = *seen.entry(k).or_insert(f);
                    assert_eq!(row, f, "{kind:?}: row {i} shares a key with row {row}");
                }
            }
        }
    }

    #[test]
    fn portable_first_copies_of_structured_rows() {
        for kind in [Kind::Double, Kind::Float] {
            for x in structured_rows(kind) {
                // A copy of each row, after the others.
                let x = Tensor::cat(&[&x, &x.flip([0])], 0);
                assert_eq!(portable(&x), brute_force(&x), "{kind:?}");
            }
        }
    }

    #[test]
    fn row_keys_do_not_depend_on_the_blocks_of_columns() {
        for kind in [Kind::Double, Kind::Float, Kind::BFloat16] {
            let x = with_copies(11, 50, 20, 37, kind);
            let whole = key(&x, i64::MAX).unwrap();
            // 50 rows: blocks of 1, 5 (the last of 2 columns) and 36 columns.
            for block_elements in [1, 250, 1800] {
                let k = key(&x, block_elements).unwrap();
                assert!(k.equal(&whole), "{kind:?} {block_elements}");
            }
            // The keys of a row are not those of its columns reordered.
            let swapped = x.index_select(0, &Tensor::from_slice(&[0i64]));
            let swapped =
                swapped.index_select(1, &Tensor::arange(37, (Kind::Int64, Device::Cpu)).flip([0]));
            let s = key(&swapped, i64::MAX).unwrap();
            assert!(!s.equal(&whole.narrow(0, 0, 1)), "{kind:?}");
        }
    }

    fn native(parts: &[&Tensor]) -> (Vec<i64>, bool) {
        let (first, copies) = first_copies(parts, Kernel::Auto).unwrap();
        (Vec::<i64>::try_from(&first).unwrap(), copies)
    }

    #[test]
    fn native_first_copies_of_signed_zeros_nan_and_empty_rows() {
        for kind in [Kind::Float, Kind::Double] {
            let x = Tensor::from_slice(&[
                0.0f64,
                1.0,
                -0.0,
                1.0,
                f64::NAN,
                2.0,
                f64::NAN,
                2.0,
                0.0,
                -1.0,
                -0.0,
                1.0,
                -0.0,
                -0.0,
                0.0,
                0.0,
            ])
            .view([8, 2])
            .to_kind(kind);
            assert_eq!(native(&[&x]), (brute_force(&x), true), "{kind:?}");
            assert_eq!(native(&[&x]).0, vec![0, 0, 2, 3, 4, 0, 6, 6]);
            let distinct = x.narrow(0, 2, 3);
            assert_eq!(native(&[&distinct]), (vec![0, 1, 2], false), "{kind:?}");
            let empty_rows = Tensor::zeros([4, 0], (kind, Device::Cpu));
            assert_eq!(native(&[&empty_rows]), (vec![0, 0, 0, 0], true));
            let no_rows = Tensor::zeros([0, 3], (kind, Device::Cpu));
            assert_eq!(native(&[&no_rows]), (vec![], false));
        }
    }

    /// Rows of several tensors, some not contiguous, numbered as if
    /// concatenated, as the portable kernel and the brute force number them.
    #[test]
    fn native_first_copies_across_parts_without_concatenating() {
        for kind in [Kind::Float, Kind::Double] {
            let y = with_copies(3, 40, 9, 6, kind);
            // Copies within x, and of rows of y.
            let x = Tensor::cat(&[with_copies(4, 30, 12, 6, kind), y.narrow(0, 0, 10)], 0);
            let x = x.tr().contiguous().tr();
            assert!(!x.is_contiguous());
            let every = Tensor::cat(&[&y, &x], 0);
            let (first, copies) = native(&[&y, &x]);
            assert!(copies);
            assert_eq!(first, brute_force(&every), "{kind:?}");
            assert_eq!(first, portable(&every), "{kind:?}");
            let none = Tensor::zeros([0, 6], (kind, Device::Cpu));
            assert_eq!(native(&[&none, &y]).0, brute_force(&y), "{kind:?}");
            // Rows of x that are rows of y take y's index.
            let shared = y.narrow(0, 5, 3).shallow_clone();
            let (first, _) = native(&[&y, &shared]);
            assert_eq!(&first[40..], &brute_force(&y)[5..8], "{kind:?}");
        }
    }

    #[test]
    fn portable_and_native_first_copies_agree() {
        for kind in [Kind::Double, Kind::Float] {
            let x = with_copies(7, 300, 40, 8, kind);
            let (native, copies) = first_copies(&[&x], Kernel::Auto).unwrap();
            assert!(copies);
            assert_eq!(
                portable(&x),
                Vec::<i64>::try_from(&native).unwrap(),
                "{kind:?}"
            );
        }
    }
}
