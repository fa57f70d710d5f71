//! The three losses on one P×K batch, with their gradients.
//!
//! Run from the repository root with `make example`, or, with a supported
//! torch (2.11–2.13) in the active Python environment:
//!
//! ```sh
//! export LD_LIBRARY_PATH=$(python -c 'import os, torch; print(os.path.dirname(torch.__file__) + "/lib")')
//! python tools/torch_build.py cargo run --release --example losses
//! ```

use online_triplet_loss::{
    batch_all_triplet_loss, batch_hard_triplet_loss, batch_semihard_triplet_loss, Distance, Error,
    TripletConfig,
};
use tch::{Device, Kind, Tensor};

fn main() -> Result<(), Error> {
    tch::manual_seed(0);
    // 8 classes × 4 samples, 16-dimensional embeddings.
    let labels =
        Tensor::arange(8, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(4, 0, None);
    let embeddings = Tensor::randn([32, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);

    let (all, fraction) = batch_all_triplet_loss(&labels, &embeddings, 0.5, false)?;
    let hard = batch_hard_triplet_loss(&labels, &embeddings, 0.5, false)?;
    let semihard = batch_semihard_triplet_loss(&labels, &embeddings, 0.5, false)?;
    let soft_cosine = TripletConfig::new(0.0)
        .distance(Distance::Cosine)
        .soft(true)
        .batch_hard(&labels, &embeddings)?;

    println!(
        "batch-all {:.4} (fraction of positive triplets {:.3})",
        f64::try_from(&all).unwrap_or(f64::NAN),
        f64::try_from(&fraction).unwrap_or(f64::NAN)
    );
    for (name, loss) in [
        ("batch-hard", &hard),
        ("semi-hard", &semihard),
        ("soft cosine batch-hard", &soft_cosine),
    ] {
        println!("{name} {:.4}", f64::try_from(loss).unwrap_or(f64::NAN));
    }

    (all + hard + semihard + soft_cosine).backward();
    let norm = f64::try_from(embeddings.grad().norm()).unwrap_or(f64::NAN);
    println!("gradient norm of the sum {norm:.4}");
    Ok(())
}
