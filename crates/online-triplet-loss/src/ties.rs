//! Identical embeddings. A distance matrix computed as ‖x‖² + ‖y‖² − 2x·y
//! rounds each entry through a matrix product whose accumulation order
//! depends on the entry's position, so two identical references can be one
//! ulp apart from the same anchor, and an embedding is not exactly at
//! distance 0 from its copy. Mining compares distances, so it first makes
//! the columns of identical references equal and the distance between
//! identical embeddings exactly 0: ties then resolve by the documented rules.

use tch::{Device, Kind, Tensor};

use crate::hash::FastMap;
use crate::mining::Kernel;
use crate::Error;

/// For each row, the index of the first row with the same values (rows
/// differing only in the sign of zeros count as the same), and whether any
/// row has an earlier copy (always `true` off the CPU, where finding out would
/// synchronise, and with the portable kernel).
fn first_copies(x: &Tensor, kernel: Kernel) -> Result<(Tensor, bool), Error> {
    let x = x.detach().f_add_scalar(0.0)?.f_contiguous()?;
    let n = x.size()[0];
    // The slices of `hashed` are made here, from the dtype matched exactly.
    match (kernel, x.device(), x.f_kind()?) {
        (Kernel::Auto, Device::Cpu, Kind::Float) => Ok(hashed::<u32>(&x, n)),
        (Kernel::Auto, Device::Cpu, Kind::Double) => Ok(hashed::<u64>(&x, n)),
        _ => Ok((sorted(&x, n)?, true)),
    }
}

fn hashed<T: Copy + Eq + std::hash::Hash>(x: &Tensor, n: i64) -> (Tensor, bool) {
    let numel = x.numel();
    let data: &[T] = if numel == 0 {
        &[]
    } else {
        // SAFETY: `x` is a contiguous CPU tensor of 4- or 8-byte floats (T
        // has that size) and outlives the slice.
        unsafe { std::slice::from_raw_parts(x.data_ptr() as *const T, numel) }
    };
    let width = if n == 0 { 0 } else { numel / n as usize };
    let mut seen: FastMap<&[T], i64> =
        FastMap::with_capacity_and_hasher(n as usize, Default::default());
    let mut copies = false;
    let first: Vec<i64> = (0..n as usize)
        .map(|i| {
            let row = &data[i * width..(i + 1) * width];
            let f = *seen.entry(row).or_insert(i as i64);
            copies |= f != i as i64;
            f
        })
        .collect();
    (Tensor::from_slice(&first), copies)
}

/// Lexicographic sort of the rows with fixed shapes: a stable sort per
/// column, last column first, then runs of equal neighbours.
fn sorted(x: &Tensor, n: i64) -> Result<Tensor, Error> {
    let opts = (Kind::Int64, x.device());
    let mut order = Tensor::f_arange(n, opts)?;
    for c in (0..x.size()[1]).rev() {
        let key = x.f_select(1, c)?.f_index_select(0, &order)?;
        let (_, by) = key.f_sort_stable(true, 0, false)?;
        order = order.f_index_select(0, &by)?;
    }
    let rows = x.f_index_select(0, &order)?;
    if n == 0 {
        return Ok(order);
    }
    let starts = rows
        .f_narrow(0, 1, n - 1)?
        .f_ne_tensor(&rows.f_narrow(0, 0, n - 1)?)?
        .f_any_dim(1, false)?;
    // Equal rows keep their original order through stable sorts, so each run
    // starts at its smallest original index.
    let positions = Tensor::f_arange(n, opts)?;
    let start_of_run = Tensor::f_cat(&[Tensor::f_ones([1], (Kind::Bool, x.device()))?, starts], 0)?;
    let run_start = positions
        .f_where_self(&start_of_run, &positions.f_zeros_like()?)?
        .f_cummax(0)?
        .0;
    let by_sorted = order.f_index_select(0, &run_start)?;
    Ok(by_sorted
        .f_zeros_like()?
        .f_index_copy(0, &order, &by_sorted)?)
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
        if same || anchor_offset.is_some() {
            let (columns, copies) = first_copies(y, kernel)?;
            let k = anchor_offset.unwrap_or(0);
            let rows = columns.f_narrow(0, k, n)?;
            Ok(copies.then_some(Ties { columns, rows }))
        } else {
            // References first, so a reference's first copy is a reference,
            // and an anchor without an identical reference gets an id ≥ m.
            let (ids, copies) = first_copies(&Tensor::f_cat(&[y, x], 0)?, kernel)?;
            if !copies {
                return Ok(None);
            }
            Ok(Some(Ties {
                columns: ids.f_narrow(0, 0, m)?,
                rows: ids.f_narrow(0, m, n)?,
            }))
        }
    }

    /// Rewrites the distances of anchors `start..start + d.size()[0]`.
    pub(crate) fn apply(&self, d: &Tensor, start: i64) -> Result<Tensor, Error> {
        let len = d.size()[0];
        let mut d = d.f_index_select(1, &self.columns)?;
        let identical = self
            .rows
            .f_narrow(0, start, len)?
            .f_unsqueeze(1)?
            .f_eq_tensor(&self.columns.f_unsqueeze(0)?)?;
        let _ = d.f_masked_fill_(&identical, 0.0)?;
        Ok(d)
    }
}
