//! Class labels: validation and the masks that define valid triplets.

use tch::{Device, Kind, Tensor};

use crate::error::dtype_name;
use crate::losses::check_placement;
use crate::Error;

/// How labels are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Domain {
    /// Integer and bool labels: compared as int64.
    Integer,
    /// Floating-point labels, or integer labels compared with floating-point
    /// ones: compared by value as float64 (1 and 1.0 are the same class, and
    /// so are -0.0 and 0.0; NaN equals nothing, not even another NaN).
    Float,
}

/// The kind of comparison that labels of this tensor's dtype need.
///
/// # Errors
/// `InvalidArgument` naming `argument` for an undefined tensor, a layout
/// other than dense, a device other than the CPU or CUDA, and dtypes that
/// are not class ids: complex, quantized, float8 and the unsigned 16-, 32-
/// and 64-bit integers
/// (which this libtorch binding cannot read).
pub(crate) fn domain(labels: &Tensor, argument: &'static str) -> Result<Domain, Error> {
    if !labels.defined() {
        return Err(Error::invalid(argument, "must be a defined tensor"));
    }
    let kind = labels.f_kind().map_err(|_| {
        Error::invalid(
            argument,
            "has a dtype this library cannot read (uint16, uint32 or uint64?); \
             pass int64 ids",
        )
    })?;
    match kind {
        Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64 | Kind::Bool => {
            check_placement(argument, labels)?;
            Ok(Domain::Integer)
        }
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double => {
            check_placement(argument, labels)?;
            Ok(Domain::Float)
        }
        Kind::ComplexHalf
        | Kind::ComplexFloat
        | Kind::ComplexDouble
        | Kind::QInt8
        | Kind::QUInt8
        | Kind::QInt32
        | Kind::Float8e5m2
        | Kind::Float8e4m3fn
        | Kind::Float8e5m2fnuz
        | Kind::Float8e4m3fnuz => Err(Error::invalid(
            argument,
            format!(
                "must hold integer class ids or real numbers, got dtype {}",
                dtype_name(kind)
            ),
        )),
    }
}

/// The common domain of two label tensors: floating point as soon as one
/// of them is.
///
/// # Errors
/// `InvalidArgument` when integer labels beyond ±2⁵³ (which float64 cannot
/// tell apart) meet floating-point labels. Finding out reads one flag from
/// the labels' device, in this mixed case only.
pub(crate) fn common(
    (a, a_labels, a_name): (Domain, &Tensor, &'static str),
    (b, b_labels, b_name): (Domain, &Tensor, &'static str),
) -> Result<Domain, Error> {
    match (a, b) {
        (Domain::Integer, Domain::Integer) => Ok(Domain::Integer),
        (Domain::Float, Domain::Float) => Ok(Domain::Float),
        (Domain::Integer, Domain::Float) => exact_in_float(a_labels, a_name, b_name),
        (Domain::Float, Domain::Integer) => exact_in_float(b_labels, b_name, a_name),
    }
}

fn exact_in_float(
    labels: &Tensor,
    argument: &'static str,
    other: &'static str,
) -> Result<Domain, Error> {
    const EXACT: i64 = 1 << 53;
    if labels.f_kind()? == Kind::Int64 && labels.numel() > 0 {
        let beyond = labels
            .f_gt(EXACT)?
            .f_logical_or(&labels.f_lt(-EXACT)?)?
            .f_any()?;
        if bool::try_from(beyond)? {
            return Err(Error::invalid(
                argument,
                format!(
                    "holds integers beyond ±2**53, which cannot be compared exactly with \
                     the floating-point {other}; give both the same integer dtype"
                ),
            ));
        }
    }
    Ok(Domain::Float)
}

/// First key of the NaN labels of anchors and of references: both ranges lie
/// in the bit patterns of NaN, which no other label maps to, and are far
/// enough apart never to meet.
pub(crate) const ANCHOR_NAN_KEYS: i64 = 0x7FF8_0000_0000_0000;
pub(crate) const REFERENCE_NAN_KEYS: i64 = 0x7FF0_0000_0000_0001;

/// Returns the labels as int64 keys that are equal exactly when the labels
/// are, in `domain`. In the float domain, labels are compared by value
/// through their float64 bits; the NaN labels at positions i get the
/// distinct keys `nan_keys + i`. Always a tensor of its own, which the
/// native kernels read as a slice without the GIL: not the caller's, which
/// may be misaligned for int64 (`torch.frombuffer` with an offset) or
/// written by another thread meanwhile.
pub(crate) fn keys(labels: &Tensor, domain: Domain, nan_keys: i64) -> Result<Tensor, Error> {
    match domain {
        Domain::Integer => Ok(labels.f_to_dtype(Kind::Int64, false, true)?),
        Domain::Float => {
            let values = labels.f_to_kind(Kind::Double)?;
            // Adding 0 turns -0.0 into 0.0, the one pair of equal floats whose bits differ.
            let bits = values.f_add_scalar(0.0)?.f_view_dtype(Kind::Int64)?;
            let n = labels.size()[0];
            let unique =
                Tensor::f_arange_start(nan_keys, nan_keys + n, (Kind::Int64, labels.device()))?;
            Ok(unique.f_where_self(&values.f_isnan()?, &bits)?)
        }
    }
}

/// Label keys on `device`. Copies to a CUDA device are queued, not made to
/// wait for the device (the keys are a tensor of their own, in pageable
/// memory, which the copy stages before it returns), so that CPU labels
/// with CUDA embeddings do not synchronise the loss as a blocking copy
/// would; copies to the CPU wait, since the native kernels read the keys at
/// once.
///
/// # Errors
/// `Error::Torch` when libtorch fails.
pub(crate) fn keys_on(keys: Tensor, device: Device) -> Result<Tensor, Error> {
    if keys.device() == device {
        return Ok(keys);
    }
    let queued = device != Device::Cpu;
    Ok(keys.f_to_device_(device, Kind::Int64, queued, false)?)
}

/// Masks of one chunk of anchors against the reference set: `same[i][j]`
/// when anchor i and reference j share a label and are not the same sample,
/// `different[i][j]` when the labels differ.
///
/// # Errors
/// `Error::Torch` when libtorch fails (out of memory, say).
pub(crate) fn masks(
    row_labels: &Tensor,
    col_labels: &Tensor,
    self_col: Option<i64>,
) -> Result<(Tensor, Tensor), Error> {
    let same = row_labels
        .f_unsqueeze(1)?
        .f_eq_tensor(&col_labels.f_unsqueeze(0)?)?;
    let different = same.f_logical_not()?;
    if let Some(first) = self_col {
        // Anchor r is column first + r: the diagonal of the columns from `first`.
        let mut diagonal = same
            .f_narrow(1, first, row_labels.size()[0])?
            .f_diagonal(0, 0, 1)?;
        let _ = diagonal.f_fill_(0)?;
    }
    Ok((same, different))
}
