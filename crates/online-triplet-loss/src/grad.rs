//! Autograd's mode around the parts that run without it.

use tch::{Device, Kind, Tensor};

use crate::Error;

/// Runs `f` with gradients off. The mode that was set before comes back on
/// every exit, a panic unwinding through `f` included (`tch::no_grad` only
/// restores it when `f` returns).
pub(crate) fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = tch::no_grad_guard();
    f()
}

/// Whether autograd records operations on this thread
/// (`torch.is_grad_enabled()`), for which tch has no getter: an operation
/// on a tensor that requires grad requires grad only then.
pub(crate) fn enabled() -> Result<bool, Error> {
    let mut leaf = Tensor::f_zeros([1], (Kind::Float, Device::Cpu))?;
    let leaf = leaf.f_requires_grad_(true)?;
    Ok(leaf.f_mul_scalar(1.0)?.requires_grad())
}

/// Whether a derivative with respect to `t` can be asked for: autograd
/// records operations on it, or it carries a tangent of forward-mode AD
/// (whose one level is 0: libtorch refuses nested levels).
pub(crate) fn differentiable(t: &Tensor) -> Result<bool, Error> {
    Ok((t.requires_grad() && enabled()?) || has_tangent(t)?)
}

/// Whether `t` carries a tangent of forward-mode AD (whose one level is 0).
pub(crate) fn has_tangent(t: &Tensor) -> Result<bool, Error> {
    let (_, tangent) = Tensor::f_internal_unpack_dual(t, 0)?;
    Ok(tangent.defined())
}
