//! Times forward + backward of one loss with each mining kernel on the CPU,
//! as a multiple of the bare gemm that benchmarks/run.py uses as its
//! yardstick (row blocks of `x @ x.T` written into one reused buffer).
//! benchmarks/run.py measures the Python package; this compares the native
//! and portable kernels, which Python does not choose between.
//!
//! ```sh
//! make bench-kernels ARGS="semihard 4096"      # mining B [repeats [native|portable]]
//! ```

use std::time::Instant;

use online_triplet_loss::{Error, Kernel, Mining, TripletConfig};
use tch::{Device, Kind, Tensor};

const D: i64 = 128;
const K: i64 = 8;
const MARGIN: f64 = 0.2;

fn usage_error(argument: &'static str, message: &str) -> Error {
    Error::InvalidArgument {
        argument,
        message: message.into(),
    }
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn time(repeats: usize, mut f: impl FnMut() -> Result<(), Error>) -> Result<f64, Error> {
    f()?;
    let mut times = vec![];
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: kernels (all|hard|semihard) B [repeats [native|portable]]";
    let mining = match args.get(1).map(String::as_str) {
        Some("all") => Mining::All,
        Some("hard") => Mining::Hard,
        Some("semihard") => Mining::SemiHard,
        _ => return Err(usage_error("mining", usage)),
    };
    let b: i64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| usage_error("B", usage))?;
    let repeats: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);

    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let labels = Tensor::arange(b / K, (Kind::Int64, Device::Cpu))
        .repeat_interleave_self_int(K, 0, None)
        .index_select(0, &Tensor::randperm(b, (Kind::Int64, Device::Cpu)));
    let x = (Tensor::randn([b, D], opts) / (D as f64).sqrt()).set_requires_grad(true);

    // The losses' chunk policy: about 2^22 elements, at least 512 rows.
    let rows = ((1i64 << 22) / b).max(512).min(b);
    let buffer = Tensor::empty([rows, b], opts);
    let xd = x.detach();
    let gemm = time(repeats, || {
        let _guard = tch::no_grad_guard();
        for start in (0..b).step_by(rows as usize) {
            let n = rows.min(b - start);
            let _ = xd
                .narrow(0, start, n)
                .f_mm_out(&buffer.narrow(0, 0, n), &xd.tr())?;
        }
        Ok(())
    })?;
    println!(
        "B={b} D={D} K={K} threads={} load={}",
        tch::get_num_threads(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().next().unwrap_or("?").to_string())
            .unwrap_or_else(|_| "?".into())
    );
    println!("gemm            {:9.1} ms", gemm * 1e3);
    let only = args.get(4).map(String::as_str);
    for (name, kernel) in [("native", Kernel::Auto), ("portable", Kernel::Portable)] {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let config = TripletConfig::new(MARGIN).kernel(kernel);
        let t = time(repeats, || {
            let _ = x.grad().f_zero_();
            let terms = config.terms(mining, &labels, &x, None)?;
            terms.mean()?.backward();
            Ok(())
        })?;
        println!(
            "{name:<9} {mining:?}  {:9.1} ms  {:5.2}× gemm",
            t * 1e3,
            t / gemm
        );
    }
    Ok(())
}
