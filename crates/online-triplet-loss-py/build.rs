//! Records the version of the torch this extension is compiled against as
//! `OTL_TORCH_VERSION`. `online_triplet_loss._torch_check` finds it in the
//! library file before loading it, so that a different torch gives an
//! ImportError instead of a crash.
//!
//! torch-sys compiles against the torch of the same interpreter: `PYO3_PYTHON`
//! when set (maturin and tools/torch_build.py set it), otherwise `python` in a
//! virtual environment and `python3` outside one.

use std::env;
use std::process::Command;

/// Reads `torch/version.py` without importing torch.
const PRINT_TORCH_VERSION: &str = r#"
import importlib.util, pathlib
spec = importlib.util.find_spec("torch")
if spec is None or spec.origin is None:
    raise SystemExit("torch is not installed in this Python environment")
path = pathlib.Path(spec.origin).with_name("version.py")
namespace = {}
exec(compile(path.read_text(), str(path), "exec"), namespace)
print(namespace["__version__"])
"#;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let python = env::var("PYO3_PYTHON").unwrap_or_else(|_| {
        let name = if env::var_os("VIRTUAL_ENV").is_some() {
            "python"
        } else {
            "python3"
        };
        name.to_owned()
    });
    let output = Command::new(&python)
        .args(["-c", PRINT_TORCH_VERSION])
        .output()
        .unwrap_or_else(|err| panic!("cannot run {python} to read the torch version: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version = stdout.trim();
    if !output.status.success() || version.is_empty() {
        panic!(
            "{python} did not report a torch version: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    println!("cargo:rustc-env=OTL_TORCH_VERSION={version}");
}
