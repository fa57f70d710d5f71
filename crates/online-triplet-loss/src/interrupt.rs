//! Stopping a long loss or evaluation between two of its chunks.

use crate::Error;

/// A function asked, between chunks, whether a long loss or evaluation
/// should stop (a user pressed Ctrl-C, say): it returns `true` to stop, and
/// the call then fails with [`Error::Interrupted`]. See
/// [`crate::TripletConfig::interrupt`] and
/// [`crate::metrics::RetrievalConfig::interrupt`]. A plain `fn`, so that
/// configurations stay `Copy`: what it reads (a flag a signal handler set,
/// say) lives in a static, such as an `AtomicBool`.
#[derive(Clone, Copy)]
pub struct Interrupt(pub fn() -> bool);

impl Interrupt {
    /// `Err(Error::Interrupted)` when `stop` is set and asks to stop.
    pub(crate) fn check(stop: Option<Interrupt>) -> Result<(), Error> {
        match stop {
            Some(Interrupt(asks)) if asks() => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }
}

impl PartialEq for Interrupt {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::fn_addr_eq(self.0, other.0)
    }
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Interrupt({:p})", self.0 as *const ())
    }
}
