//! Bad input, degenerate batches, non-finite values and dtypes.

use online_triplet_loss::{
    batch_all_triplet_loss, batch_hard_triplet_loss, batch_semihard_triplet_loss, Distance, Error,
    Kernel, Mining, References, TripletConfig,
};
use tch::{Device, Kind, Tensor};

const MININGS: [Mining; 3] = [Mining::All, Mining::Hard, Mining::SemiHard];

fn argument(err: Error) -> &'static str {
    match err {
        Error::InvalidArgument { argument, .. } => argument,
        other => panic!("expected an invalid argument, got {other}"),
    }
}

fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

#[test]
fn bad_input_is_an_error_naming_the_argument() {
    let x = Tensor::randn([4, 3], cpu(Kind::Float));
    let y = Tensor::from_slice(&[0i64, 0, 1, 1]);
    let cfg = TripletConfig::new(1.0);
    let cases: Vec<(&str, Result<Tensor, Error>)> = vec![
        ("embeddings", cfg.batch_hard(&y, &x.flatten(0, -1))),
        ("embeddings", cfg.batch_hard(&x, &y)),
        ("labels", cfg.batch_hard(&y.reshape([2, 2]), &x)),
        ("labels", cfg.batch_hard(&y.narrow(0, 0, 3), &x)),
        ("embeddings", cfg.batch_hard(&y, &y.reshape([4, 1]))),
        ("margin", TripletConfig::new(-0.1).batch_hard(&y, &x)),
        ("margin", TripletConfig::new(f64::NAN).batch_hard(&y, &x)),
        (
            "margin",
            TripletConfig::new(f64::INFINITY).batch_hard(&y, &x),
        ),
        ("chunk_size", cfg.chunk_size(0).batch_hard(&y, &x)),
        // Beyond float32, the loss's dtype for these embeddings.
        ("margin", TripletConfig::new(1e39).batch_hard(&y, &x)),
        (
            "margin",
            TripletConfig::new(65505.0).batch_hard(&y, &x.to_kind(Kind::Half)),
        ),
        (
            "labels",
            cfg.batch_hard(
                &Tensor::from_slice(&[0i64, 0, 1, 1]).to_kind(Kind::ComplexFloat),
                &x,
            ),
        ),
    ];
    for (want, got) in cases {
        assert_eq!(argument(got.unwrap_err()), want);
    }
    let refs = References {
        embeddings: &[&Tensor::randn([5, 2], cpu(Kind::Float))],
        labels: &Tensor::from_slice(&[0i64, 1, 2, 3, 4]),
        anchor_offset: None,
    };
    let err = cfg.terms(Mining::All, &y, &x, Some(&refs)).unwrap_err();
    assert_eq!(argument(err), "ref_embeddings");
    assert_eq!(
        "manhattan".parse::<Distance>().map_err(argument),
        Err("distance")
    );
    // The largest value of the dtype is a margin.
    assert!(TripletConfig::new(65504.0)
        .batch_hard(&y, &x.to_kind(Kind::Half))
        .is_ok());
    assert!(TripletConfig::new(1e39)
        .batch_hard(&y, &x.to_kind(Kind::Double))
        .is_ok());
    let message = cfg.batch_hard(&x, &y).unwrap_err().to_string();
    assert!(message.contains("swapped"), "{message}");
}

#[test]
fn degenerate_batches_give_zero_loss_and_zero_gradients() {
    let batches: Vec<(Vec<i64>, i64)> = vec![
        (vec![], 0),
        (vec![3], 1),
        (vec![2, 2, 2, 2], 4),
        (vec![0, 1, 2, 3, 4], 5),
    ];
    for (labels, b) in batches {
        for mining in MININGS {
            for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
                let x = Tensor::randn([b, 3], cpu(Kind::Float)).set_requires_grad(true);
                let cfg = TripletConfig::new(1.0).distance(distance);
                let terms = cfg
                    .terms(mining, &Tensor::from_slice(&labels), &x, None)
                    .unwrap();
                let loss = terms.mean().unwrap();
                loss.backward();
                assert_eq!(f64::try_from(&loss).unwrap(), 0.0, "{labels:?} {mining:?}");
                assert_eq!(f64::try_from(&terms.fraction().unwrap()).unwrap(), 0.0);
                assert_eq!(
                    f64::try_from(x.grad().abs().sum(Kind::Double)).unwrap(),
                    0.0
                );
            }
        }
    }
}

#[test]
fn non_finite_embeddings_give_a_nan_loss() {
    for bad in [f64::NAN, f64::INFINITY] {
        // The bad sample is a singleton class: no triplet needs it as a positive.
        let x = Tensor::randn([5, 3], cpu(Kind::Float));
        let _ = x.get(4).get(1).fill_(bad);
        let y = Tensor::from_slice(&[0i64, 0, 1, 1, 9]);
        let (all, _) = batch_all_triplet_loss(&y, &x, 1.0, false).unwrap();
        let hard = batch_hard_triplet_loss(&y, &x, 1.0, false).unwrap();
        let semi = batch_semihard_triplet_loss(&y, &x, 1.0, true).unwrap();
        for loss in [all, hard, semi] {
            assert!(f64::try_from(&loss).unwrap().is_nan());
        }
        // Also when the batch has no valid triplet at all.
        let lone = Tensor::from_slice(&[0i64, 1, 2, 3, 4]);
        let loss = batch_hard_triplet_loss(&lone, &x, 1.0, false).unwrap();
        assert!(f64::try_from(&loss).unwrap().is_nan());
    }
}

#[test]
fn duplicates_have_finite_gradients_in_every_dtype() {
    for kind in [Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16] {
        let base = Tensor::randn([3, 4], cpu(Kind::Float));
        let mut x = Tensor::cat(&[&base, &base], 0)
            .to_kind(kind)
            .set_requires_grad(true);
        let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
        for mining in MININGS {
            for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
                let cfg = TripletConfig::new(0.5).distance(distance);
                let loss = match mining {
                    Mining::All => cfg.batch_all(&y, &x).unwrap().0,
                    Mining::Hard => cfg.batch_hard(&y, &x).unwrap(),
                    Mining::SemiHard => cfg.batch_semihard(&y, &x).unwrap(),
                };
                assert_eq!(loss.kind(), kind);
                x.zero_grad();
                loss.backward();
                let finite = x.grad().isfinite().all();
                assert!(
                    bool::try_from(&finite).unwrap(),
                    "{kind:?} {mining:?} {distance:?}"
                );
            }
        }
    }
}

#[test]
fn float_and_narrow_integer_labels_are_class_ids() {
    let x = Tensor::randn([6, 3], cpu(Kind::Double));
    let ids = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2]);
    let want = batch_hard_triplet_loss(&ids, &x, 1.0, false).unwrap();
    for kind in [
        Kind::Uint8,
        Kind::Int8,
        Kind::Int16,
        Kind::Int,
        Kind::Float,
        Kind::Double,
    ] {
        let got = batch_hard_triplet_loss(&ids.to_kind(kind), &x, 1.0, false).unwrap();
        assert!(got.allclose(&want, 0.0, 0.0, false), "{kind:?}");
    }
    // 1.5 is its own class, not 1.
    let fractional = Tensor::from_slice(&[0.0f64, 0.0, 1.0, 1.0, 1.5, 1.5]);
    let got = batch_hard_triplet_loss(&fractional, &x, 1.0, false).unwrap();
    let relabelled = Tensor::from_slice(&[0i64, 0, 1, 1, 7, 7]);
    let want = batch_hard_triplet_loss(&relabelled, &x, 1.0, false).unwrap();
    assert!(got.allclose(&want, 0.0, 0.0, false));
}

/// A chunk size of any magnitude is one chunk: the batch takes the chunked
/// path (the half-matrix one needs 4 or 16 chunks), bit for bit what the
/// batch passed as its own references gives, and nothing overflows.
#[test]
fn huge_chunk_sizes_are_one_chunk() {
    tch::manual_seed(3);
    let x = Tensor::randn([40, 5], cpu(Kind::Double));
    let labels = Tensor::arange(40, (Kind::Int64, Device::Cpu)).divide_scalar_mode(3, "floor");
    for mining in [Mining::All, Mining::SemiHard, Mining::Hard] {
        for rows in [40, 1 << 59, (1 << 61) + 1, i64::MAX] {
            let cfg = TripletConfig::new(0.2).chunk_size(rows);
            let got = cfg.terms(mining, &labels, &x, None).unwrap();
            let references = References {
                embeddings: &[&x],
                labels: &labels,
                anchor_offset: Some(0),
            };
            let want = cfg.terms(mining, &labels, &x, Some(&references)).unwrap();
            assert!(got.sum.equal(&want.sum), "{mining:?} chunk_size {rows}");
            assert!(got.count.equal(&want.count), "{mining:?} chunk_size {rows}");
        }
    }
}

/// A margin near the largest float32: d_ap + m rounds to f32::MAX and its
/// bound, the next float32 up, is +inf, as is every other column's in the
/// portable batch-all; whichever order those take, both kernels give the
/// loss d_ap − d_an + m.
#[test]
fn batch_all_with_a_margin_near_the_largest_float() {
    let x = Tensor::from_slice(&[0.0f32]).view([1, 1]);
    let labels = Tensor::from_slice(&[0i64]);
    for (points, ref_labels) in [([2e13f32, 1e13], [1i64, 0]), ([1e13, 2e13], [0, 1])] {
        let y = Tensor::from_slice(&points).view([2, 1]);
        let ref_labels = Tensor::from_slice(&ref_labels);
        let refs = References {
            embeddings: &[&y],
            labels: &ref_labels,
            anchor_offset: None,
        };
        let want = 1e26 - 4e26 + f64::from(f32::MAX);
        for kernel in [Kernel::Auto, Kernel::Portable] {
            let terms = TripletConfig::new(f64::from(f32::MAX))
                .distance(Distance::Squared)
                .kernel(kernel)
                .terms(Mining::All, &labels, &x, Some(&refs))
                .unwrap();
            let sum = terms.sum.double_value(&[]);
            assert_eq!(terms.count.int64_value(&[]), 1, "{kernel:?} {points:?}");
            assert!(
                (sum - want).abs() <= 1e-6 * want,
                "{kernel:?} {points:?}: {sum:e}, want {want:e}"
            );
        }
    }
}
