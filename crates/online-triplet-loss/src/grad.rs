//! Autograd's mode around the parts that run without it.

/// Runs `f` with gradients off. The mode that was set before comes back on
/// every exit, a panic unwinding through `f` included (`tch::no_grad` only
/// restores it when `f` returns).
pub(crate) fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _guard = tch::no_grad_guard();
    f()
}
