//! The Rust API never panics on what a caller controls, and leaves autograd's
//! mode as it found it.

use online_triplet_loss::metrics::RetrievalConfig;
use online_triplet_loss::{Distance, Error, Mining, References, Terms, TripletConfig};
use tch::{Device, Kind, Tensor};

const MININGS: [Mining; 3] = [Mining::All, Mining::Hard, Mining::SemiHard];

fn grad_enabled() -> bool {
    // A fresh leaf times a tensor that requires grad requires grad exactly
    // when autograd records.
    let w = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    (&w * 2.0).requires_grad()
}

#[test]
fn anchor_offsets_near_the_integer_limits_are_errors() {
    let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 0, 1, 1]);
    for offset in [i64::MAX, i64::MAX - 2, i64::MIN, -1, 1] {
        let refs = References {
            embeddings: &[&x],
            labels: &y,
            anchor_offset: Some(offset),
        };
        for mining in MININGS {
            let err = TripletConfig::new(0.2)
                .terms(mining, &y, &x, Some(&refs))
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        argument: "anchor_offset",
                        ..
                    }
                ),
                "{offset}: {err}"
            );
        }
    }
}

#[test]
fn terms_of_mismatched_shapes_are_errors() {
    let scalar = || Tensor::zeros([], (Kind::Float, Device::Cpu));
    let count = || Tensor::zeros([], (Kind::Int64, Device::Cpu));
    let cases = [
        Terms {
            sum: Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            count: count(),
            valid: count(),
            margin_grad: scalar(),
        },
        Terms {
            sum: scalar(),
            count: Tensor::zeros([2, 2], (Kind::Int64, Device::Cpu)),
            valid: count(),
            margin_grad: scalar(),
        },
        Terms {
            sum: scalar(),
            count: count(),
            valid: Tensor::zeros([5], (Kind::Int64, Device::Cpu)),
            margin_grad: scalar(),
        },
        Terms {
            sum: count(),
            count: count(),
            valid: count(),
            margin_grad: scalar(),
        },
        // A float count would be truncated nowhere but compared as a count.
        Terms {
            sum: scalar(),
            count: scalar(),
            valid: count(),
            margin_grad: scalar(),
        },
        Terms {
            sum: scalar(),
            count: count(),
            valid: Tensor::zeros([], (Kind::Int, Device::Cpu)),
            margin_grad: scalar(),
        },
    ];
    for terms in cases {
        assert!(matches!(terms.mean(), Err(Error::InvalidArgument { .. })));
        assert!(matches!(
            terms.fraction(),
            Err(Error::InvalidArgument { .. })
        ));
    }
}

#[test]
fn paired_distances_of_other_shapes_are_errors() {
    let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
        for y in [x.narrow(0, 0, 3), x.narrow(1, 0, 2), x.flatten(0, -1)] {
            assert!(matches!(
                distance.paired(&x, &y),
                Err(Error::InvalidArgument { .. })
            ));
        }
        // A review found an x that is not 2-D blamed on y.
        for bad in [x.flatten(0, -1), x.unsqueeze(0)] {
            let err = distance.paired(&bad, &bad).unwrap_err();
            assert!(names(&err, "x"), "{err:?}");
        }
    }
}

#[test]
fn a_margin_error_shows_the_margin_in_few_digits() {
    // A review found -1e-300 shown as a decimal of over 300 digits.
    let (y, x) = (
        Tensor::from_slice(&[0i64, 0, 1]),
        Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
    );
    for (margin, shown) in [(-1e-300, "-1e-300"), (f64::MIN, "-1.7976931348623157e308")] {
        let err = TripletConfig::new(margin).batch_hard(&y, &x).unwrap_err();
        assert_eq!(
            err,
            Error::InvalidArgument {
                argument: "margin",
                message: format!("must be finite and >= 0, got {shown}"),
            }
        );
    }
}

#[test]
fn a_failure_inside_the_mining_is_an_error_and_restores_grad_mode() {
    // A single chunk of 200000 × 200000 distances (160 GB) cannot be
    // allocated: libtorch fails after validation, inside the no-grad part.
    let n = 200_000;
    let x = Tensor::zeros([n, 1], (Kind::Float, Device::Cpu));
    let y = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(2);
    for enabled in [true, false] {
        let _mode = if enabled {
            None
        } else {
            Some(tch::no_grad_guard())
        };
        for mining in MININGS {
            let err = TripletConfig::new(0.2)
                .chunk_size(n)
                .terms(mining, &y, &x, None)
                .unwrap_err();
            assert!(matches!(err, Error::Torch(_)), "{err}");
            assert_eq!(grad_enabled(), enabled);
        }
        let err = RetrievalConfig::new(Distance::Euclidean)
            .chunk_size(n)
            .recall_at_k(&x, &y, &[1])
            .unwrap_err();
        assert!(matches!(err, Error::Torch(_)), "{err}");
        assert_eq!(grad_enabled(), enabled);
    }
}

#[test]
fn unusable_dtypes_are_errors() {
    let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 0, 1, 1]);
    for kind in [
        Kind::Float8e4m3fn,
        Kind::Float8e5m2,
        Kind::ComplexFloat,
        Kind::Int64,
        Kind::Bool,
    ] {
        let err = TripletConfig::new(0.2)
            .batch_hard(&y, &x.to_kind(kind))
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    argument: "embeddings",
                    ..
                }
            ),
            "{kind:?}: {err}"
        );
    }
    // Complex and quantised labels (libtorch quantises only from floats).
    let quantised = y
        .to_kind(Kind::Float)
        .quantize_per_tensor(1.0, 0, Kind::QInt8);
    for labels in [y.to_kind(Kind::ComplexFloat), quantised] {
        let err = TripletConfig::new(0.2).batch_all(&labels, &x).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    argument: "labels",
                    ..
                }
            ),
            "{:?}: {err}",
            labels.kind()
        );
    }
    let sparse = x.to_sparse_sparse_dim(2);
    assert!(matches!(
        TripletConfig::new(0.2).batch_semihard(&y, &sparse),
        Err(Error::InvalidArgument {
            argument: "embeddings",
            ..
        })
    ));
}

fn names(err: &Error, name: &str) -> bool {
    matches!(err, Error::InvalidArgument { argument, .. } if *argument == name)
}

#[test]
fn paired_distances_of_unusable_tensors_are_errors() {
    // libtorch fails inside scalar operations on these, where tch 0.26
    // panics instead of returning its error: they are refused first.
    let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
        for kind in [Kind::ComplexFloat, Kind::Bool, Kind::Int64] {
            let bad = x.to_kind(kind);
            let err = distance.paired(&bad, &bad).unwrap_err();
            assert!(names(&err, "x"), "{distance} {kind:?}: {err}");
            let err = distance.paired(&x, &bad).unwrap_err();
            assert!(names(&err, "y"), "{distance} {kind:?}: {err}");
        }
        let err = distance.paired(&x, &Tensor::new()).unwrap_err();
        assert!(names(&err, "y"), "{distance}: {err}");
    }
}

#[test]
fn undefined_and_sparse_tensors_are_errors() {
    let x = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 0, 1, 1]);
    let undefined = Tensor::new();
    for mining in MININGS {
        let config = TripletConfig::new(0.2);
        let err = config.terms(mining, &undefined, &x, None).unwrap_err();
        assert!(names(&err, "labels"), "{err}");
        let err = config.terms(mining, &y, &undefined, None).unwrap_err();
        assert!(names(&err, "embeddings"), "{err}");
        let sparse = Tensor::from_slice(&[0.2f32]).to_sparse_sparse_dim(1);
        for (margin, says) in [(&undefined, "defined"), (&sparse, "dense")] {
            let err = config
                .terms_with_margin(mining, &y, &x, None, margin)
                .unwrap_err();
            assert!(
                names(&err, "margin") && err.to_string().contains(says),
                "{err}"
            );
        }
    }
    let metrics = RetrievalConfig::new(Distance::Euclidean);
    for labels in [undefined.shallow_clone(), y.to_sparse_sparse_dim(1)] {
        let err = metrics.recall_at_k(&x, &labels, &[1]).unwrap_err();
        assert!(names(&err, "labels"), "{err}");
    }
    let err = metrics.evaluate(&undefined, &y, &[1]).unwrap_err();
    assert!(
        names(&err, "embeddings") && err.to_string().contains("defined"),
        "{err}"
    );
    let zero = || Tensor::zeros([], (Kind::Int64, Device::Cpu));
    let terms = Terms {
        sum: Tensor::new(),
        count: zero(),
        valid: zero(),
        margin_grad: Tensor::zeros([], (Kind::Float, Device::Cpu)),
    };
    assert!(names(&terms.mean().unwrap_err(), "sum"));
    assert!(names(&terms.fraction().unwrap_err(), "sum"));
}

#[test]
fn a_margin_tensor_that_is_not_the_margin_poisons_the_mined_losses() {
    let x = Tensor::randn([6, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let y = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2]);
    let config = TripletConfig::new(1.0);
    for (value, poisoned) in [(1.0, false), (-5.0, true), (f64::NAN, true), (0.5, true)] {
        let m = Tensor::from_slice(&[value as f32])
            .reshape([])
            .set_requires_grad(true);
        for mining in [Mining::All, Mining::SemiHard] {
            let terms = config.terms_with_margin(mining, &y, &x, None, &m).unwrap();
            let sum = f64::try_from(&terms.sum).unwrap();
            assert_eq!(sum.is_nan(), poisoned, "{mining:?} {value}: {sum}");
        }
    }
    // Batch-hard takes the tensor's value, which must be a margin: finite
    // and >= 0, as the config's.
    for (value, poisoned) in [
        (0.5, false),
        (0.0, false),
        (-0.0, false),
        (-1e-30, true),
        (f64::INFINITY, true),
        (f64::NAN, true),
    ] {
        let m = Tensor::from_slice(&[value as f32])
            .reshape([])
            .set_requires_grad(true);
        let terms = config
            .terms_with_margin(Mining::Hard, &y, &x, None, &m)
            .unwrap();
        let sum = f64::try_from(&terms.sum).unwrap();
        assert_eq!(sum.is_nan(), poisoned, "hard {value}: {sum}");
        let grads = Tensor::run_backward(&[&terms.sum], &[&x, &m], false, false);
        for g in &grads {
            let nan = g.isnan().any().int64_value(&[]) != 0;
            assert_eq!(nan, poisoned, "hard {value}: gradient {g:?}");
        }
        if !poisoned {
            let plain = TripletConfig::new(value.abs())
                .terms(Mining::Hard, &y, &x, None)
                .unwrap();
            assert_eq!(sum, f64::try_from(&plain.sum).unwrap(), "hard {value}");
        }
    }
}

#[test]
fn paired_euclidean_distances_neither_underflow_nor_overflow() {
    // Pairs whose squared differences leave the dtype's range: the distance
    // and its gradient, (x - y)/d, are representable and must come out.
    for (kind, scales) in [
        (Kind::Float, [1e-30, 1e-42, 1e20, 1.0]),
        (Kind::Double, [1e-160, 1e-310, 1e160, 1.0]),
    ] {
        for scale in scales {
            let x = Tensor::from_slice(&[0.25 * scale, -1.5 * scale])
                .view([1, 2])
                .to_kind(kind)
                .set_requires_grad(true);
            let y = Tensor::from_slice(&[-2.75 * scale, 2.5 * scale])
                .view([1, 2])
                .to_kind(kind);
            // The differences as the dtype holds them: float32 rounds them.
            let held =
                Vec::<f64>::try_from((&x - &y).detach().to_kind(Kind::Double).view([-1])).unwrap();
            let want = held[0].hypot(held[1]);
            assert!(want > 0.0, "{kind:?} {scale}: {held:?}");
            let d = Distance::Euclidean.paired(&x, &y).unwrap();
            let got = f64::try_from(&d.to_kind(Kind::Double)).unwrap();
            // Relative, and the spacing of subnormal results.
            let (tolerance, spacing) = if kind == Kind::Float {
                (1e-6, 1.5e-45)
            } else {
                (1e-14, 5e-324)
            };
            assert!(
                (got - want).abs() <= tolerance * want + spacing,
                "{kind:?} {scale}: {got} vs {want}"
            );
            let g = Tensor::run_backward(&[&d.sum(kind)], &[&x], false, false);
            let g = Vec::<f64>::try_from(g[0].to_kind(Kind::Double).view([-1])).unwrap();
            for (gi, hi) in g.iter().zip(&held) {
                assert!(
                    (gi - hi / want).abs() <= tolerance,
                    "{kind:?} {scale}: {g:?}"
                );
            }
        }
    }
    // Identical rows: 0, with the subgradient 0, in every dtype.
    for kind in [Kind::Half, Kind::BFloat16, Kind::Float, Kind::Double] {
        let x = Tensor::from_slice(&[0.5f64, -2.0, 0.0, 0.0])
            .view([2, 2])
            .to_kind(kind)
            .set_requires_grad(true);
        for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
            let d = distance.paired(&x, &x.detach()).unwrap();
            let values = Vec::<f64>::try_from(d.to_kind(Kind::Double)).unwrap();
            let want = if distance == Distance::Cosine {
                [0.0, 1.0]
            } else {
                [0.0, 0.0]
            };
            for (v, w) in values.iter().zip(want) {
                assert!((v - w).abs() < 1e-3, "{kind:?} {distance}: {values:?}");
            }
            let g = Tensor::run_backward(&[&d.sum(kind)], &[&x], false, false);
            let finite = g[0].isfinite().all().int64_value(&[]) != 0;
            assert!(finite, "{kind:?} {distance}: {:?}", g[0]);
        }
    }
    // No columns, or no rows.
    for shape in [[3i64, 0], [0, 3]] {
        let x = Tensor::zeros(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
            let d = distance.paired(&x, &x.detach()).unwrap();
            assert_eq!(d.size(), [shape[0]], "{distance} {shape:?}");
            let g = Tensor::run_backward(&[&d.sum(Kind::Float)], &[&x], false, false);
            assert_eq!(g[0].size(), shape, "{distance} {shape:?}");
        }
    }
}

#[test]
fn metrics_of_embeddings_below_the_normal_range() {
    // Rankings are scale-free: points times 1e-39 (float32 subnormals) and
    // times 1e-310 (float64) rank as the points do.
    let points = [0.0, 0.1, 0.2, 5.0, 5.1, 0.17];
    let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1]);
    let config = RetrievalConfig::new(Distance::Euclidean);
    for (kind, scale) in [(Kind::Float, 1e-39), (Kind::Double, 1e-310)] {
        let unscaled = Tensor::from_slice(&points).view([6, 1]).to_kind(kind);
        let tiny = (Tensor::from_slice(&points) * scale)
            .view([6, 1])
            .to_kind(kind);
        let want = config.evaluate(&unscaled, &labels, &[1, 2]).unwrap();
        let got = config.evaluate(&tiny, &labels, &[1, 2]).unwrap();
        assert_eq!(got, want, "{kind:?}");
    }
}

#[test]
fn second_derivatives_through_first_order_losses_fail() {
    // Batch-all's and semi-hard's gradients are constants given to autograd:
    // differentiating them again, with respect to anything, must fail, not
    // give 0. Batch-hard's are exact.
    let y = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2]);
    let ref_labels = Tensor::from_slice(&[0i64, 1, 2, 0]);
    for distance in [Distance::Euclidean, Distance::Squared, Distance::Cosine] {
        let config = TripletConfig::new(1.0).distance(distance);
        for mining in MININGS {
            for kind in [Kind::Float, Kind::Double, Kind::Half] {
                let x = Tensor::randn([6, 3], (kind, Device::Cpu)).set_requires_grad(true);
                let r = Tensor::randn([4, 3], (kind, Device::Cpu)).set_requires_grad(true);
                let m = Tensor::from_slice(&[1.0f64])
                    .reshape([])
                    .set_requires_grad(true);
                let references = References {
                    embeddings: &[&r],
                    labels: &ref_labels,
                    anchor_offset: None,
                };
                for with_references in [false, true] {
                    let refs = with_references.then_some(&references);
                    let loss = config
                        .terms_with_margin(mining, &y, &x, refs, &m)
                        .unwrap()
                        .mean()
                        .unwrap();
                    let sources: Vec<&Tensor> = if with_references {
                        vec![&x, &r, &m]
                    } else {
                        vec![&x, &m]
                    };
                    for wrt in &sources {
                        let g = Tensor::f_run_backward(&[&loss], &[*wrt], true, true).unwrap();
                        let finite = g[0].f_isfinite().unwrap().f_all().unwrap();
                        for of in &sources {
                            let case = format!(
                                "{mining:?} {distance:?} {kind:?} {with_references}: d/d{:?} of d/d{:?}",
                                of.size(),
                                wrt.size()
                            );
                            assert!(bool::try_from(&finite).unwrap(), "{case}: finite");
                            let second = g[0].requires_grad().then(|| {
                                let total = g[0].f_sum(Kind::Double).unwrap();
                                Tensor::f_run_backward(&[&total], &[*of], true, false)
                            });
                            match (mining, second) {
                                (Mining::Hard, None | Some(Ok(_))) => {}
                                (Mining::Hard, Some(Err(e))) => panic!("{case}: {e}"),
                                (_, Some(Err(e))) => {
                                    assert!(
                                        e.to_string().contains("_segment_reduce_backward"),
                                        "{case}: {e}"
                                    )
                                }
                                (_, _) => panic!("{case}: a second derivative, silently"),
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn an_interrupt_is_asked_before_each_chunk_and_stops_the_metrics() {
    use online_triplet_loss::metrics::Interrupt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static ASKED: AtomicUsize = AtomicUsize::new(0);
    fn third() -> bool {
        ASKED.fetch_add(1, Ordering::SeqCst) == 2
    }
    fn never() -> bool {
        false
    }
    let x = Tensor::randn([40, 3], (Kind::Float, Device::Cpu));
    let labels = Tensor::arange(40, (Kind::Int64, Device::Cpu)).remainder(4);
    let plain = RetrievalConfig::new(Distance::Euclidean).chunk_size(10);
    let want = plain.evaluate(&x, &labels, &[1, 3]).unwrap();
    let got = plain
        .interrupt(Interrupt(never))
        .evaluate(&x, &labels, &[1, 3])
        .unwrap();
    assert_eq!(got, want);
    // Four chunks of ten queries: stopped before the third.
    let stopped = plain.interrupt(Interrupt(third));
    assert_eq!(stopped.evaluate(&x, &labels, &[1]), Err(Error::Interrupted));
    assert_eq!(ASKED.load(Ordering::SeqCst), 3);
    assert!(grad_enabled());
    assert_ne!(stopped, plain);
    assert_eq!(stopped, plain.interrupt(Interrupt(third)));
}

#[test]
fn an_interrupt_is_asked_between_chunks_and_stops_the_losses() {
    use online_triplet_loss::{Interrupt, Kernel};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static ASKED: AtomicUsize = AtomicUsize::new(0);
    fn count() -> bool {
        ASKED.fetch_add(1, Ordering::SeqCst);
        false
    }
    fn second() -> bool {
        ASKED.fetch_add(1, Ordering::SeqCst) == 1
    }
    let distinct = Tensor::randn([40, 3], (Kind::Float, Device::Cpu));
    // An identical pair: the chunked path instead of the half matrix.
    let tied = distinct.copy();
    tied.get(1).copy_(&distinct.get(0));
    let labels = Tensor::arange(40, (Kind::Int64, Device::Cpu)).remainder(8);
    for mining in [Mining::All, Mining::Hard, Mining::SemiHard] {
        for kernel in [Kernel::Auto, Kernel::Portable] {
            for x in [&distinct, &tied] {
                // Twenty chunks of two anchors: the half-matrix kernels of
                // every mining take the distinct batch.
                let plain = TripletConfig::new(0.5).kernel(kernel).chunk_size(2);
                let want = plain.terms(mining, &labels, x, None).unwrap();
                ASKED.store(0, Ordering::SeqCst);
                let got = plain
                    .interrupt(Interrupt(count))
                    .terms(mining, &labels, x, None)
                    .unwrap();
                let case = (mining, kernel, x.equal(&tied));
                assert_eq!(ASKED.load(Ordering::SeqCst), 19, "{case:?}");
                assert!(got.sum.equal(&want.sum), "{case:?}");
                assert!(got.count.equal(&want.count), "{case:?}");
                ASKED.store(0, Ordering::SeqCst);
                let stopped = plain
                    .interrupt(Interrupt(second))
                    .terms(mining, &labels, x, None);
                assert_eq!(stopped.err(), Some(Error::Interrupted), "{case:?}");
                assert_eq!(ASKED.load(Ordering::SeqCst), 2, "{case:?}");
                assert!(grad_enabled());
            }
        }
    }
}

fn not_dense(argument: &'static str, message: &str) -> Error {
    Error::InvalidArgument {
        argument,
        message: message.into(),
    }
}

#[test]
fn a_nested_tensor_is_an_invalid_argument_not_a_panic() {
    // libtorch's sizes() throws on a nested tensor, which tch's size()
    // turns into a panic (found by the static review): none may start, not
    // even one caught, whose hook prints tch's text. Panics on this test's
    // thread are counted; other threads' go to the usual hook.
    let this = std::thread::current().id();
    let panics = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = panics.clone();
    let usual = std::sync::Arc::new(std::panic::take_hook());
    let other = usual.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() == this {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        other(info)
    }));
    let padded = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
    let shapes = Tensor::from_slice(&[3i64, 4, 2, 4]).view([2, 2]);
    let nested = Tensor::f_internal_nested_from_padded(&padded, &shapes, false).unwrap();
    let labels = Tensor::from_slice(&[0i64, 0, 1]);
    let plain = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
    for mining in [Mining::All, Mining::Hard, Mining::SemiHard] {
        let err = TripletConfig::new(0.2).terms(mining, &labels, &nested, None);
        assert_eq!(
            err.unwrap_err(),
            not_dense("embeddings", "must be a dense (strided) tensor")
        );
    }
    assert_eq!(
        Distance::Euclidean.paired(&nested, &plain).unwrap_err(),
        not_dense("x", "must be a dense (strided) tensor")
    );
    let metric = RetrievalConfig::new(Distance::Euclidean).recall_at_k(&nested, &labels, &[1]);
    assert_eq!(
        metric.unwrap_err(),
        not_dense("embeddings", "must be a dense (strided) tensor")
    );
    let _ = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| usual(info)));
    assert_eq!(panics.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(grad_enabled());
}
