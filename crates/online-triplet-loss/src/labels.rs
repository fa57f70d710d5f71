//! Class labels: validation and the masks that define valid triplets.

use tch::{Kind, Tensor};

use crate::Error;

/// Returns the labels as int64 keys that are equal exactly when the labels
/// are. Integer and bool labels are widened; floating-point labels (0.0.6
/// accepted them) are compared by value, so 1.5 and 1.0 stay distinct.
pub(crate) fn label_keys(labels: &Tensor, argument: &'static str) -> Result<Tensor, Error> {
    match labels.kind() {
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64 | Kind::Bool => {
            Ok(labels.to_kind(Kind::Int64))
        }
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double => {
            // Adding 0 turns -0.0 into 0.0, the one pair of equal floats whose bits differ.
            Ok((labels.to_kind(Kind::Double) + 0.0).view_dtype(Kind::Int64))
        }
        other => Err(Error::invalid(
            argument,
            format!("must hold integer class ids or floats, got dtype {other:?}"),
        )),
    }
}

/// Masks of one chunk of anchors against the reference set: `same[i][j]`
/// when anchor i and reference j share a label and are not the same sample,
/// `different[i][j]` when the labels differ.
pub(crate) fn masks(
    row_labels: &Tensor,
    col_labels: &Tensor,
    self_col: Option<i64>,
) -> (Tensor, Tensor) {
    let equal = row_labels.unsqueeze(1).eq_tensor(&col_labels.unsqueeze(0));
    let different = equal.logical_not();
    let same = match self_col {
        Some(first) => {
            let rows = row_labels.size()[0];
            let cols = col_labels.size()[0];
            let opts = (Kind::Int64, row_labels.device());
            let row_self = Tensor::arange(rows, opts).unsqueeze(1) + first;
            let col = Tensor::arange(cols, opts).unsqueeze(0);
            equal.logical_and(&col.ne_tensor(&row_self))
        }
        None => equal,
    };
    (same, different)
}
