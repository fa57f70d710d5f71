//! The losses against plain-loop float64 references over (a, p, n), written
//! without tch, with gradients checked by central finite differences of the
//! reference.

use online_triplet_loss::{Distance, Kernel, Mining, References, TripletConfig};
use tch::{Device, Kind, Tensor};

const DISTANCES: [Distance; 3] = [Distance::Euclidean, Distance::Squared, Distance::Cosine];

fn dist(x: &[f64], y: &[f64], distance: Distance) -> f64 {
    match distance {
        Distance::Squared => x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum(),
        Distance::Euclidean => dist(x, y, Distance::Squared).sqrt(),
        Distance::Cosine => {
            let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            let dot: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
            1.0 - dot / (norm(x) * norm(y))
        }
    }
}

/// A batch of anchors mined against references; `offset` marks anchor i as
/// reference offset + i.
struct Problem {
    x: Vec<Vec<f64>>,
    xl: Vec<i64>,
    y: Vec<Vec<f64>>,
    yl: Vec<i64>,
    offset: Option<usize>,
}

impl Problem {
    fn positive(&self, a: usize, p: usize) -> bool {
        self.xl[a] == self.yl[p] && self.offset.is_none_or(|o| o + a != p)
    }

    fn negative(&self, a: usize, n: usize) -> bool {
        self.xl[a] != self.yl[n]
    }

    /// (loss, fraction) of the reference definitions.
    fn loss(&self, mining: Mining, cfg: &TripletConfig) -> (f64, f64) {
        let m = cfg.margin;
        let d = |a: usize, j: usize| dist(&self.x[a], &self.y[j], cfg.distance);
        let (mut sum, mut count, mut valid) = (0.0, 0usize, 0usize);
        for a in 0..self.x.len() {
            let pos: Vec<usize> = (0..self.y.len()).filter(|&p| self.positive(a, p)).collect();
            let neg: Vec<usize> = (0..self.y.len()).filter(|&n| self.negative(a, n)).collect();
            match mining {
                Mining::All => {
                    for &p in &pos {
                        for &n in &neg {
                            valid += 1;
                            let l = d(a, p) - d(a, n) + m;
                            if l > 0.0 {
                                sum += l;
                                count += 1;
                            }
                        }
                    }
                }
                Mining::Hard => {
                    if pos.is_empty() || neg.is_empty() {
                        continue;
                    }
                    let hp = pos.iter().map(|&p| d(a, p)).fold(f64::MIN, f64::max);
                    let hn = neg.iter().map(|&n| d(a, n)).fold(f64::MAX, f64::min);
                    let z = hp - hn + m;
                    sum += if cfg.soft {
                        z.exp().ln_1p()
                    } else {
                        z.max(0.0)
                    };
                    count += 1;
                }
                Mining::SemiHard => {
                    if neg.is_empty() {
                        continue;
                    }
                    for &p in &pos {
                        let dap = d(a, p);
                        let above = neg.iter().map(|&n| d(a, n)).filter(|&v| v > dap);
                        let dan = above
                            .fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.min(v))))
                            .unwrap_or_else(|| {
                                neg.iter().map(|&n| d(a, n)).fold(f64::MIN, f64::max)
                            });
                        sum += (dap - dan + m).max(0.0);
                        count += 1;
                        valid += 1;
                    }
                }
            }
        }
        let loss = if count > 0 { sum / count as f64 } else { 0.0 };
        let fraction = if valid > 0 {
            count as f64 / valid as f64
        } else {
            0.0
        };
        (loss, fraction)
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    let n = t.size()[0];
    (0..n)
        .map(|i| Vec::<f64>::try_from(t.get(i)).unwrap())
        .collect()
}

fn random_batch(seed: i64, b: i64, classes: i64, dim: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let labels = Tensor::randint(classes, [b], (Kind::Int64, Device::Cpu));
    let x = Tensor::randn([b, dim], (Kind::Double, Device::Cpu));
    (labels, x)
}

fn compute(
    cfg: &TripletConfig,
    mining: Mining,
    labels: &Tensor,
    x: &Tensor,
    refs: Option<(&Tensor, &Tensor, Option<i64>)>,
) -> (f64, f64, Tensor, Option<Tensor>) {
    let x = x.detach().set_requires_grad(true);
    let y = refs.map(|(e, _, _)| e.detach().set_requires_grad(true));
    let parts: Vec<&Tensor> = y.iter().collect();
    let references = refs.map(|(_, l, o)| References {
        embeddings: &parts,
        labels: l,
        anchor_offset: o,
    });
    let terms = cfg.terms(mining, labels, &x, references.as_ref()).unwrap();
    let loss = terms.mean().unwrap();
    loss.backward();
    (
        f64::try_from(&loss).unwrap(),
        f64::try_from(&terms.fraction().unwrap()).unwrap(),
        x.grad(),
        y.map(|y| y.grad()),
    )
}

fn finite_difference(
    problem: &mut Problem,
    mining: Mining,
    cfg: &TripletConfig,
    refs: bool,
) -> Vec<Vec<f64>> {
    let h = 1e-6;
    let rows = if refs {
        problem.y.len()
    } else {
        problem.x.len()
    };
    let mut grad = vec![];
    for i in 0..rows {
        let mut g = vec![];
        for k in 0..problem.x[0].len() {
            let mut at = |delta: f64| {
                if refs {
                    problem.y[i][k] += delta;
                } else {
                    problem.x[i][k] += delta;
                    if problem.offset.is_some() {
                        problem.y[i][k] += delta;
                    }
                }
                let v = problem.loss(mining, cfg).0;
                if refs {
                    problem.y[i][k] -= delta;
                } else {
                    problem.x[i][k] -= delta;
                    if problem.offset.is_some() {
                        problem.y[i][k] -= delta;
                    }
                }
                v
            };
            g.push((at(h) - at(-h)) / (2.0 * h));
        }
        grad.push(g);
    }
    grad
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
        "{what}: got {got}, want {want}"
    );
}

fn assert_grad(got: &Tensor, want: &[Vec<f64>], what: &str) {
    for (i, row) in rows(got).iter().enumerate() {
        for (k, g) in row.iter().enumerate() {
            assert!(
                (g - want[i][k]).abs() <= 1e-5 * (1.0 + want[i][k].abs()),
                "{what}: grad[{i}][{k}] = {g}, finite difference {}",
                want[i][k]
            );
        }
    }
}

fn configs() -> Vec<TripletConfig> {
    let mut out = vec![];
    for distance in DISTANCES {
        for kernel in [Kernel::Auto, Kernel::Portable] {
            for (margin, soft, chunk) in [
                (0.5, false, None),
                (0.0, true, Some(3)),
                (2.0, false, Some(1)),
            ] {
                let mut cfg = TripletConfig::new(margin)
                    .distance(distance)
                    .soft(soft)
                    .kernel(kernel);
                cfg.chunk_size = chunk;
                out.push(cfg);
            }
        }
    }
    out
}

#[test]
fn losses_match_the_reference_on_random_batches() {
    for (case, b) in [2i64, 3, 5, 9, 16, 25, 40].into_iter().enumerate() {
        let classes = 1 + (case as i64 * 3) % 7;
        let (labels, x) = random_batch(case as i64, b, classes, 3);
        let mut problem = Problem {
            x: rows(&x),
            xl: Vec::<i64>::try_from(&labels).unwrap(),
            y: rows(&x),
            yl: Vec::<i64>::try_from(&labels).unwrap(),
            offset: Some(0),
        };
        for cfg in configs() {
            for mining in [Mining::All, Mining::Hard, Mining::SemiHard] {
                let what = format!("B={b} {mining:?} {cfg:?}");
                let (loss, fraction, grad, _) = compute(&cfg, mining, &labels, &x, None);
                let (want, want_fraction) = problem.loss(mining, &cfg);
                assert_close(loss, want, &what);
                if mining == Mining::All {
                    assert_close(fraction, want_fraction, &what);
                }
                if b <= 16 {
                    let fd = finite_difference(&mut problem, mining, &cfg, false);
                    assert_grad(&grad, &fd, &what);
                }
            }
        }
    }
}

#[test]
fn reference_sets_match_the_reference() {
    let (labels, x) = random_batch(11, 7, 3, 3);
    let (ref_labels, y) = random_batch(12, 9, 4, 3);
    for offset in [None, Some(2)] {
        // With an offset the anchors are rows 2..9 of the references.
        let y = match offset {
            Some(_) => Tensor::cat(&[y.narrow(0, 0, 2), x.shallow_clone()], 0),
            None => y.shallow_clone(),
        };
        let yl = match offset {
            Some(_) => Tensor::cat(&[ref_labels.narrow(0, 0, 2), labels.shallow_clone()], 0),
            None => ref_labels.shallow_clone(),
        };
        let mut problem = Problem {
            x: rows(&x),
            xl: Vec::<i64>::try_from(&labels).unwrap(),
            y: rows(&y),
            yl: Vec::<i64>::try_from(&yl).unwrap(),
            offset: offset.map(|o| o as usize),
        };
        for cfg in configs() {
            for mining in [Mining::All, Mining::Hard, Mining::SemiHard] {
                let what = format!("refs offset={offset:?} {mining:?} {cfg:?}");
                let (loss, _, gx, gy) = compute(&cfg, mining, &labels, &x, Some((&y, &yl, offset)));
                assert_close(loss, problem.loss(mining, &cfg).0, &what);
                if offset.is_none() {
                    // Anchors and references are independent tensors here.
                    assert_grad(
                        &gx,
                        &finite_difference(&mut problem, mining, &cfg, false),
                        &what,
                    );
                    assert_grad(
                        &gy.unwrap(),
                        &finite_difference(&mut problem, mining, &cfg, true),
                        &what,
                    );
                }
            }
        }
    }
}

#[test]
fn native_and_portable_kernels_agree_on_ties_and_chunks() {
    // Duplicated rows make equal distances; both kernels must pick the same triplets.
    let (labels, x) = random_batch(5, 60, 6, 4);
    let x = Tensor::cat(&[x.narrow(0, 0, 30), x.narrow(0, 0, 30)], 0);
    for distance in DISTANCES {
        for mining in [Mining::All, Mining::Hard, Mining::SemiHard] {
            let base = TripletConfig::new(0.3).distance(distance);
            let (loss, fraction, grad, _) = compute(&base, mining, &labels, &x, None);
            for (kernel, chunk) in [
                (Kernel::Portable, 7),
                (Kernel::Auto, 13),
                (Kernel::Portable, 60),
            ] {
                let cfg = base.kernel(kernel).chunk_size(chunk);
                let (l, f, g, _) = compute(&cfg, mining, &labels, &x, None);
                let what = format!("{mining:?} {distance:?} {kernel:?} chunk {chunk}");
                assert_close(l, loss, &what);
                assert_close(f, fraction, &what);
                assert!(
                    g.allclose(&grad, 1e-9, 1e-9, false),
                    "{what}: gradients differ"
                );
            }
        }
    }
}

#[test]
fn identical_embeddings_tie_exactly() {
    // Copies across classes put a negative at exactly the distance of a
    // positive, and copies within a class put positives at distance 0.
    for seed in 0..12 {
        let (labels, x) = random_batch(100 + seed, 14, 4, 5);
        let copy = |x: &Tensor, from: i64, to: i64| {
            x.get(to).copy_(&x.get(from));
        };
        copy(&x, 0, 5);
        copy(&x, 1, 9);
        copy(&x, 2, 3);
        let problem = Problem {
            x: rows(&x),
            xl: Vec::<i64>::try_from(&labels).unwrap(),
            y: rows(&x),
            yl: Vec::<i64>::try_from(&labels).unwrap(),
            offset: Some(0),
        };
        for distance in DISTANCES {
            for kernel in [Kernel::Auto, Kernel::Portable] {
                for margin in [0.0, 0.4] {
                    let cfg = TripletConfig::new(margin).distance(distance).kernel(kernel);
                    for mining in [Mining::All, Mining::Hard, Mining::SemiHard] {
                        let (loss, fraction, _, _) = compute(&cfg, mining, &labels, &x, None);
                        let (want, want_fraction) = problem.loss(mining, &cfg);
                        let what = format!("seed {seed} {mining:?} {cfg:?}");
                        assert_close(loss, want, &what);
                        if mining == Mining::All {
                            assert_close(fraction, want_fraction, &what);
                        }
                    }
                }
            }
        }
    }
}

/// Batch-all and semi-hard of a batch against itself, which take half of
/// the Gram matrix when no class has more than 17 samples and the batch
/// spans enough chunks (4 and 16), against the same batch passed as its own
/// references (the chunked path over the whole matrix). On distinct points
/// of a small grid, whose centred coordinates and distances are exact in
/// both and tie with whole margins (and, in float32, with a margin below
/// the rounding of t = d_ap + m), and on random points for the cosine
/// distance, the counts are equal and the loss and gradient agree: for
/// every distance, both dtypes, chunks of 1 to all anchors, classes of one
/// sample (no positive), of 17 (the most the half-matrix paths take) and
/// of 18 (the chunked path then).
#[test]
fn losses_from_half_the_matrix_match_the_whole_matrix() {
    let mut cases = 0;
    for (seed, (n, dim, classes, big)) in [
        (40, 3, 5, 0),
        (70, 4, 70, 0),
        (62, 4, 9, 17),
        (50, 3, 4, 18),
        (64, 4, 12, 0),
        (66, 4, 20, 0),
        (200, 4, 40, 0),
    ]
    .into_iter()
    .enumerate()
    {
        for kind in [Kind::Float, Kind::Double] {
            tch::manual_seed(seed as i64);
            // Distinct points (identical ones take the chunked path), in
            // pairs ±p, so that their mean is 0 and centring them is exact:
            // n/2 points whose first coordinate is negative, and their negations.
            let half = 2 * 4i64.pow(dim as u32 - 1);
            let pick = Tensor::randperm(half, (Kind::Int64, Device::Cpu)).narrow(0, 0, n / 2);
            let digits: Vec<Tensor> = (0..dim)
                .map(|k| {
                    pick.divide_scalar_mode(4i64.pow(k as u32), "floor")
                        .remainder(4)
                })
                .rev()
                .collect();
            let half = Tensor::stack(&digits, 1).to_kind(kind) - 1.5;
            let grid = Tensor::cat(&[&half, &half.neg()], 0);
            let random = Tensor::randn([n, dim], (kind, Device::Cpu));
            let labels = Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu));
            // `big` samples of one more class.
            let _ = labels.narrow(0, 0, big).fill_(classes);
            for distance in DISTANCES {
                // Cosine distances of grid points tie only up to rounding,
                // which differs between the two paths' products.
                let x = match distance {
                    Distance::Cosine => &random,
                    _ => &grid,
                };
                for (margin, mining) in [0.0, 1e-7, 0.5, 1.0]
                    .into_iter()
                    .flat_map(|m| [(m, Mining::All), (m, Mining::SemiHard)])
                {
                    for step in [1, 5, 12, 16, 17, 33, n] {
                        let cfg = TripletConfig::new(margin)
                            .distance(distance)
                            .chunk_size(step);
                        let run = |refs: bool| {
                            let x = x.detach().set_requires_grad(true);
                            let references = References {
                                embeddings: &[&x],
                                labels: &labels,
                                anchor_offset: Some(0),
                            };
                            let t = cfg
                                .terms(mining, &labels, &x, refs.then_some(&references))
                                .unwrap();
                            t.sum.backward();
                            let count = i64::try_from(&t.count).unwrap();
                            let valid = i64::try_from(&t.valid).unwrap();
                            (f64::try_from(&t.sum).unwrap(), count, valid, x.grad())
                        };
                        let (sum, count, valid, grad) = run(false);
                        let (want_sum, want_count, want_valid, want_grad) = run(true);
                        let what =
                            format!("seed {seed} {kind:?} {distance:?} m {margin} step {step}");
                        assert_eq!((count, valid), (want_count, want_valid), "{what}");
                        let tol = if kind == Kind::Float { 1e-5 } else { 1e-12 };
                        assert!(
                            (sum - want_sum).abs() <= tol * want_sum.abs().max(1.0),
                            "{what}: {sum} against {want_sum}"
                        );
                        let scale = f64::try_from(want_grad.abs().max()).unwrap().max(1.0);
                        assert!(
                            grad.allclose(&want_grad, 0.0, tol * scale, false),
                            "{what}: gradients differ"
                        );
                        cases += 1;
                    }
                }
            }
        }
    }
    assert_eq!(cases, 7 * 2 * 3 * 4 * 2 * 7);
}
