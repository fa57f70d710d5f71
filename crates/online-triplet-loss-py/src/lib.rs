//! The Python extension `online_triplet_loss._core`. It converts arguments
//! and errors; validation messages, the math and the gradients come from the
//! Rust crate.

use online_triplet_loss::metrics::{AveragePrecision, Items, RetrievalConfig};
use online_triplet_loss::{
    Distance, Error, Interrupt, Kernel, Mining, References, Terms, TripletConfig,
};
use pyo3::exceptions::{PyKeyboardInterrupt, PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

fn to_py(err: Error) -> PyErr {
    match err {
        Error::InvalidArgument { .. } => PyValueError::new_err(err.to_string()),
        Error::Torch(_) => PyRuntimeError::new_err(err.to_string()),
        Error::Interrupted => PyKeyboardInterrupt::new_err(err.to_string()),
        Error::OutOfMemory { .. } => Python::with_gil(|py| host_out_of_memory(py, err.to_string())),
    }
}

/// The class of a native host buffer that could not be allocated, made in
/// [`_core`]: a `MemoryError`, as Python's own allocations raise, and a
/// `RuntimeError`, as torch's CPU tensors raise, so that code catching
/// either catches it.
const HOST_OUT_OF_MEMORY: &std::ffi::CStr = c"
class HostOutOfMemoryError(MemoryError, RuntimeError):
    'A buffer of the native CPU kernels could not be allocated.'
    __module__ = 'online_triplet_loss'
";

fn host_out_of_memory(py: Python<'_>, message: String) -> PyErr {
    match py
        .import("online_triplet_loss._core")
        .and_then(|core| core.getattr("HostOutOfMemoryError"))
        .and_then(|class| class.call1((message.as_str(),)))
    {
        Ok(err) => PyErr::from_value(err),
        Err(_) => PyMemoryError::new_err(message),
    }
}

/// A libtorch failure as Python sees torch's own: an allocator that ran out
/// of device memory ("CUDA out of memory", "MPS backend out of memory")
/// raises `torch.OutOfMemoryError`, which code that shrinks the batch and
/// retries catches; anything else, a CPU allocation included (torch itself
/// raises RuntimeError there), a RuntimeError.
fn torch_failure(py: Python<'_>, message: String) -> PyErr {
    if message.contains("out of memory") {
        if let Ok(oom) = py
            .import("torch")
            .and_then(|torch| torch.getattr("OutOfMemoryError"))
            .and_then(|class| class.call1((message.as_str(),)))
        {
            return PyErr::from_value(oom);
        }
    }
    PyRuntimeError::new_err(message)
}

/// `py.allow_threads(f)`, for a thread that may still be in `f` when the
/// interpreter shuts down (a daemon thread at exit). Before Python 3.14,
/// taking the GIL back then ends the thread with `pthread_exit`, whose forced
/// unwinding through Rust frames aborts the process ("FATAL: exception not
/// rethrown"). Here the unwinding stops in a guard that parks the thread
/// until the process exits, as Python 3.14 does itself (and as PyO3 does for
/// `PyGILState_Ensure`, not for `allow_threads`).
fn without_gil<T>(_py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    extern "C-unwind" {
        fn PyEval_RestoreThread(state: *mut pyo3::ffi::PyThreadState);
    }
    struct ParkForever;
    impl Drop for ParkForever {
        fn drop(&mut self) {
            loop {
                std::thread::park();
            }
        }
    }
    // SAFETY: the thread holds the GIL (`_py`); the GIL is taken back before
    // any return, panics included (`f` is run in `catch_unwind`). PyO3's
    // count of the GIL is left as it was, so `f` must capture no Python
    // object (`Py`, `PyErr`, `Bound`: the callers' closures capture tensors,
    // settings and a `fn`) and must take the GIL with `PyGILState_Ensure`,
    // as `python_signals` does, not with `Python::with_gil`, which would
    // believe it held.
    unsafe {
        let state = pyo3::ffi::PyEval_SaveThread();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let park = ParkForever;
        PyEval_RestoreThread(state);
        std::mem::forget(park);
        result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

/// Runs `f` without the GIL; a panic inside libtorch's bindings becomes an
/// exception as an `Err` does (see [`libtorch_panic`]), instead of a
/// PanicException, which `except Exception` would not catch.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    match without_gil(py, || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
    }) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err @ Error::Torch(_))) => Err(torch_failure(py, err.to_string())),
        // What the signal handler raised, which `python_signals` left set.
        Ok(Err(Error::Interrupted)) => {
            Err(PyErr::take(py).unwrap_or_else(|| to_py(Error::Interrupted)))
        }
        Ok(Err(err)) => Err(to_py(err)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown error");
            Err(torch_failure(py, libtorch_panic(message)))
        }
    }
}

/// The message of a panic: a libtorch error's, as an `Err` carries it, for
/// tch's panics on libtorch failures (see [`Error::from_tch_panic`]).
fn libtorch_panic(message: &str) -> String {
    Error::from_tch_panic(message).map_or_else(|| message.to_string(), |err| err.to_string())
}

/// The panics of [`libtorch_panic`] are turned into exceptions with their
/// message: the default hook would also print each to stderr (an
/// out-of-memory error that a training script catches and recovers from,
/// say). Every other panic is printed as before.
fn quiet_libtorch_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let from_scalar = info.location().is_some_and(|at| {
            let file = at.file();
            file.ends_with("wrappers/scalar.rs") || file.ends_with("wrappers\\scalar.rs")
        });
        if !from_scalar {
            previous(info);
        }
    }));
}

fn mining(name: &str) -> PyResult<Mining> {
    match name {
        "all" => Ok(Mining::All),
        "hard" => Ok(Mining::Hard),
        "semihard" => Ok(Mining::SemiHard),
        other => Err(PyValueError::new_err(format!(
            "mining: expected 'all', 'hard' or 'semihard', got {other:?}"
        ))),
    }
}

/// Unnormalised terms of a triplet loss: (sum, count, valid). `portable`
/// mines with libtorch operations, CUDA's path, also on the CPU (for tests
/// and profiles). `ref_embeddings` is a tensor or a sequence of them, parts
/// whose rows follow each other ([`References::embeddings`]). Signals
/// (Ctrl-C) are checked between chunks of anchors, as in [`retrieval`].
#[pyfunction]
#[pyo3(signature = (mining_name, labels, embeddings, margin, distance, soft, ref_embeddings=None, ref_labels=None, anchor_offset=None, chunk_size=None, margin_tensor=None, portable=false))]
#[allow(clippy::too_many_arguments)]
fn triplet_terms(
    py: Python<'_>,
    mining_name: &str,
    labels: PyTensor,
    embeddings: PyTensor,
    margin: f64,
    distance: &str,
    soft: bool,
    ref_embeddings: Option<Parts>,
    ref_labels: Option<PyTensor>,
    anchor_offset: Option<i64>,
    chunk_size: Option<i64>,
    margin_tensor: Option<PyTensor>,
    portable: bool,
) -> PyResult<(PyTensor, PyTensor, PyTensor)> {
    let mining = mining(mining_name)?;
    let kernel = if portable {
        Kernel::Portable
    } else {
        Kernel::Auto
    };
    let mut config = TripletConfig::new(margin)
        .distance(distance.parse::<Distance>().map_err(to_py)?)
        .soft(soft)
        .kernel(kernel)
        .interrupt(Interrupt(python_signals));
    config.chunk_size = chunk_size;
    let (labels, embeddings) = (labels.0, embeddings.0);
    let margin_tensor = margin_tensor.map(|t| t.0);
    let references = match (ref_embeddings, ref_labels) {
        (Some(e), Some(l)) => Some((e.tensors(), l.0)),
        (None, None) if anchor_offset.is_some() => {
            return Err(PyValueError::new_err(
                "anchor_offset: places the anchors in ref_embeddings, which were not given",
            ))
        }
        (None, None) => None,
        _ => {
            return Err(PyValueError::new_err(
                "ref_embeddings and ref_labels: must be given together",
            ))
        }
    };
    let terms = run(py, move || {
        let parts: Vec<&Tensor> = references.iter().flat_map(|(e, _)| e.iter()).collect();
        let references = references.as_ref().map(|(_, l)| References {
            embeddings: &parts,
            labels: l,
            anchor_offset,
        });
        match margin_tensor {
            Some(margin) => {
                config.terms_with_margin(mining, &labels, &embeddings, references.as_ref(), &margin)
            }
            None => config.terms(mining, &labels, &embeddings, references.as_ref()),
        }
    })?;
    Ok((
        PyTensor(terms.sum),
        PyTensor(terms.count),
        PyTensor(terms.valid),
    ))
}

/// Reference embeddings: one tensor, or parts whose rows follow each other.
#[derive(FromPyObject)]
enum Parts {
    One(PyTensor),
    Many(Vec<PyTensor>),
}

impl Parts {
    fn tensors(self) -> Vec<Tensor> {
        match self {
            Parts::One(t) => vec![t.0],
            Parts::Many(parts) => parts.into_iter().map(|t| t.0).collect(),
        }
    }
}

/// `Terms` of `triplet_terms`' parts, and the dtype of `like`, which must be
/// floating point.
fn terms_like(
    sum: Tensor,
    count: Tensor,
    valid: Tensor,
    like: &Tensor,
) -> Result<(Terms, Kind), Error> {
    let kind = like.f_kind().map_err(|_| Error::InvalidArgument {
        argument: "like",
        message: "has a dtype this library cannot read; must be floating point".into(),
    })?;
    if !like.is_floating_point() {
        return Err(Error::InvalidArgument {
            argument: "like",
            message: format!("must be a floating-point tensor, got dtype {kind:?}"),
        });
    }
    let terms = Terms {
        // Read by neither `mean` nor `fraction`.
        margin_grad: sum.shallow_clone(),
        sum,
        count,
        valid,
    };
    Ok((terms, kind))
}

/// The loss `sum / max(count, 1)` and fraction `count / max(valid, 1)` of
/// `triplet_terms`, in the dtype of `like`.
#[pyfunction]
fn mean_and_fraction(
    py: Python<'_>,
    sum: PyTensor,
    count: PyTensor,
    valid: PyTensor,
    like: PyTensor,
) -> PyResult<(PyTensor, PyTensor)> {
    run(py, move || {
        let (terms, kind) = terms_like(sum.0, count.0, valid.0, &like.0)?;
        Ok((
            PyTensor(terms.mean()?.f_to_kind(kind)?),
            PyTensor(terms.fraction()?.f_to_kind(kind)?),
        ))
    })
}

/// The loss `sum / max(count, 1)` of `triplet_terms`, in the dtype of `like`.
#[pyfunction]
fn mean(py: Python<'_>, sum: PyTensor, count: PyTensor, like: PyTensor) -> PyResult<PyTensor> {
    run(py, move || {
        let valid = count.0.shallow_clone();
        let (terms, kind) = terms_like(sum.0, count.0, valid, &like.0)?;
        Ok(PyTensor(terms.mean()?.f_to_kind(kind)?))
    })
}

/// The metrics' settings, with the check for signals (Ctrl-C), which does
/// nothing off Python's main thread. That thread is not asked for here:
/// before Python 3.13 `threading.main_thread()` is whichever thread first
/// imported `threading`.
fn retrieval(distance: &str, chunk_size: Option<i64>) -> PyResult<RetrievalConfig> {
    let mut config = RetrievalConfig::new(distance.parse::<Distance>().map_err(to_py)?)
        .interrupt(Interrupt(python_signals));
    config.chunk_size = chunk_size;
    Ok(config)
}

/// Runs Python's signal handlers, and whether one raised: its exception
/// (KeyboardInterrupt for Ctrl-C) stays set, for [`run`] to raise when the
/// computation has stopped. At most every 100 ms: taking the GIL from a
/// thread of Python code that is busy waits for its switch interval (5 ms),
/// which every chunk would pay.
fn python_signals() -> bool {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    thread_local! {
        static ASKED: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = ASKED.with(|asked| {
        let due = asked
            .get()
            .is_none_or(|then| now.duration_since(then) >= Duration::from_millis(100));
        if due {
            asked.set(Some(now));
        }
        due
    });
    if !due {
        return false;
    }
    // SAFETY: this thread does not hold the GIL (see `without_gil`). What a
    // handler raised stays set in the thread's state, where `run` finds it.
    unsafe {
        let gil = pyo3::ffi::PyGILState_Ensure();
        let raised = pyo3::ffi::PyErr_CheckSignals() != 0;
        pyo3::ffi::PyGILState_Release(gil);
        raised
    }
}

/// recall@k per k, the mean average precision and mINP asked for, and the
/// number of queries.
type ScoresTuple = (Vec<f64>, Option<f64>, Option<f64>, i64);

/// recall@k for each of `ks` and, with `full` (`Some(false)`: MAP@R,
/// `Some(true)`: over the whole ranking, with mINP), the mean average precision, of
/// every item against the others or, with a reference set, of the queries
/// against it; with cameras, a query retrieves no item of its own label
/// from its own camera. `float64` ranks in float64 whatever the dtype.
/// Also returns the number of queries averaged over.
#[pyfunction]
#[pyo3(signature = (embeddings, labels, ks, *, full, distance, chunk_size=None, cameras=None, ref_embeddings=None, ref_labels=None, ref_cameras=None, float64=false))]
#[allow(clippy::too_many_arguments)]
fn retrieval_scores(
    py: Python<'_>,
    embeddings: PyTensor,
    labels: PyTensor,
    ks: Vec<i64>,
    full: Option<bool>,
    distance: &str,
    chunk_size: Option<i64>,
    cameras: Option<PyTensor>,
    ref_embeddings: Option<PyTensor>,
    ref_labels: Option<PyTensor>,
    ref_cameras: Option<PyTensor>,
    float64: bool,
) -> PyResult<ScoresTuple> {
    let config = retrieval(distance, chunk_size)?.float64(float64);
    let precision = full.map(|full| match full {
        true => AveragePrecision::Full,
        false => AveragePrecision::AtR,
    });
    let queries = (embeddings.0, labels.0, cameras.map(|c| c.0));
    let gallery = match (ref_embeddings, ref_labels, ref_cameras) {
        (Some(y), Some(y_labels), cameras) => Some((y.0, y_labels.0, cameras.map(|c| c.0))),
        (None, None, None) => None,
        (Some(_), None, _) => {
            return Err(PyValueError::new_err(
                "ref_labels: must be given with ref_embeddings",
            ))
        }
        (None, Some(_), _) => {
            return Err(PyValueError::new_err(
                "ref_embeddings: must be given with ref_labels",
            ))
        }
        (None, None, Some(_)) => {
            return Err(PyValueError::new_err(
                "ref_cameras: are the cameras of ref_embeddings, which is not given",
            ))
        }
    };
    run(py, move || {
        let gallery = gallery.as_ref().map(items);
        let scores = config.scores(items(&queries), gallery, &ks, precision)?;
        Ok((
            scores.recall,
            scores.average_precision,
            scores.inverse_negative_penalty,
            scores.queries,
        ))
    })
}

/// The metrics' view of embeddings, labels and cameras.
fn items((embeddings, labels, cameras): &(Tensor, Tensor, Option<Tensor>)) -> Items<'_> {
    let items = Items::new(embeddings, labels);
    match cameras {
        Some(cameras) => items.cameras(cameras),
        None => items,
    }
}

macro_rules! torch_record_prefix {
    () => {
        "online-triplet-loss built against torch "
    };
}

/// The torch this extension is compiled against (see build.rs), kept as one
/// NUL-terminated string in the library file: `online_triplet_loss._torch_check`
/// reads it there before the library is loaded.
static TORCH_RECORD: &str = concat!(torch_record_prefix!(), env!("OTL_TORCH_VERSION"), "\0");

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    quiet_libtorch_panics();
    let errors = PyModule::from_code(
        m.py(),
        HOST_OUT_OF_MEMORY,
        c"online_triplet_loss/_core_errors.py",
        c"online_triplet_loss._core_errors",
    )?;
    m.add(
        "HostOutOfMemoryError",
        errors.getattr("HostOutOfMemoryError")?,
    )?;
    m.add_function(wrap_pyfunction!(triplet_terms, m)?)?;
    m.add_function(wrap_pyfunction!(mean_and_fraction, m)?)?;
    m.add_function(wrap_pyfunction!(mean, m)?)?;
    m.add_function(wrap_pyfunction!(retrieval_scores, m)?)?;
    // black_box keeps the whole record in the library, unfolded.
    let record = std::hint::black_box(TORCH_RECORD);
    m.add(
        "TORCH_VERSION",
        &record[torch_record_prefix!().len()..record.len() - 1],
    )?;
    Ok(())
}
