//! References given in parts (a batch, then a memory bank) give what their
//! concatenation gives: the same loss and the same gradients, forward and
//! backward, for every part that requires grad, on both kernels.

use online_triplet_loss::{Distance, Error, Kernel, Mining, References, TripletConfig};
use tch::{Device, Kind, Tensor};

const MININGS: [Mining; 3] = [Mining::All, Mining::Hard, Mining::SemiHard];
const DISTANCES: [Distance; 3] = [Distance::Euclidean, Distance::Squared, Distance::Cosine];

/// Parts with whether each requires grad, their labels and the anchor offset.
type Case = (Vec<(Tensor, bool)>, Tensor, Option<i64>);

/// The loss and the gradients of the anchors and of each part (`None` for
/// one that does not require grad), with the references in `parts` or, when
/// `joined`, in one concatenated tensor.
fn run(
    cfg: &TripletConfig,
    mining: Mining,
    (labels, x): (&Tensor, &Tensor),
    (parts, ref_labels, offset): (&[(Tensor, bool)], &Tensor, Option<i64>),
    joined: bool,
) -> (Tensor, Tensor, Vec<Option<Tensor>>) {
    let x = x.detach().set_requires_grad(true);
    let leaves: Vec<Tensor> = parts
        .iter()
        .map(|(t, grad)| t.detach().set_requires_grad(*grad))
        .collect();
    // An anchor offset 0 with the batch first: the anchors are that part.
    let leaves: Vec<Tensor> = leaves
        .into_iter()
        .enumerate()
        .map(|(i, t)| match (i, offset) {
            (0, Some(0)) if parts[0].1 => x.shallow_clone(),
            _ => t,
        })
        .collect();
    let cat;
    let given: Vec<&Tensor> = match joined {
        true => {
            cat = Tensor::cat(&leaves, 0);
            vec![&cat]
        }
        false => leaves.iter().collect(),
    };
    let references = References {
        embeddings: &given,
        labels: ref_labels,
        anchor_offset: offset,
    };
    let loss = cfg
        .terms(mining, labels, &x, Some(&references))
        .unwrap()
        .mean()
        .unwrap();
    loss.backward();
    let grads = leaves
        .iter()
        .map(|t| t.requires_grad().then(|| t.grad().copy()))
        .collect();
    (loss.detach(), x.grad().copy(), grads)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let close = got.allclose(want, 1e-10, 1e-12, false);
    let scale = want.abs().max().double_value(&[]);
    assert!(
        close,
        "{what}: off by {} (scale {scale})",
        (got - want).abs().max().double_value(&[])
    );
}

#[test]
fn parts_give_what_their_concatenation_gives() {
    tch::manual_seed(7);
    let opts = (Kind::Double, Device::Cpu);
    let b = 12;
    let labels = Tensor::randint(4, [b], (Kind::Int64, Device::Cpu));
    let x = Tensor::randn([b, 5], opts);
    let bank = Tensor::randn([30, 5], opts);
    let bank_labels = Tensor::randint(4, [30], (Kind::Int64, Device::Cpu));
    let more = Tensor::randn([7, 5], opts);
    let more_labels = Tensor::randint(4, [7], (Kind::Int64, Device::Cpu));
    let empty = Tensor::zeros([0, 5], opts);
    let none = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    let cases: Vec<Case> = vec![
        // A batch, then a memory bank: CrossBatchMemory.
        (
            vec![(x.copy(), true), (bank.copy(), false)],
            Tensor::cat(&[&labels, &bank_labels], 0),
            Some(0),
        ),
        // A constant part between two that require grad, an empty one.
        (
            vec![
                (bank.copy(), true),
                (more.copy(), false),
                (empty.copy(), false),
                (x.copy(), true),
            ],
            Tensor::cat(&[&bank_labels, &more_labels, &none, &labels], 0),
            None,
        ),
        // Constant parts only.
        (
            vec![(bank.copy(), false), (more.copy(), false)],
            Tensor::cat(&[&bank_labels, &more_labels], 0),
            None,
        ),
        // The anchors inside the second part, which requires grad.
        (
            vec![(more.copy(), false), (x.copy(), true), (bank.copy(), false)],
            Tensor::cat(&[&more_labels, &labels, &bank_labels], 0),
            Some(7),
        ),
    ];
    for kernel in [Kernel::Auto, Kernel::Portable] {
        for distance in DISTANCES {
            for mining in MININGS {
                let cfg = TripletConfig::new(0.3)
                    .distance(distance)
                    .kernel(kernel)
                    .chunk_size(5);
                for (i, (parts, ref_labels, offset)) in cases.iter().enumerate() {
                    let refs = (parts.as_slice(), ref_labels, *offset);
                    let what = format!("{kernel:?} {distance:?} {mining:?} case {i}");
                    let (want, want_gx, want_grads) = run(&cfg, mining, (&labels, &x), refs, true);
                    let (got, got_gx, got_grads) = run(&cfg, mining, (&labels, &x), refs, false);
                    assert!(
                        want.double_value(&[]) > 0.0,
                        "{what}: a zero loss tests nothing"
                    );
                    assert_close(&format!("{what}: loss"), &got, &want);
                    assert_close(&format!("{what}: anchors' gradient"), &got_gx, &want_gx);
                    for (k, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
                        match (g, w) {
                            (Some(g), Some(w)) => {
                                assert_close(&format!("{what}: part {k}'s gradient"), g, w)
                            }
                            (None, None) => {}
                            _ => panic!("{what}: part {k}: a gradient on one side only"),
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn parts_are_checked_each() {
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([4, 3], opts);
    let labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
    let ref_labels = Tensor::from_slice(&[0i64, 1, 0, 1, 2]);
    let (good, narrow) = (Tensor::randn([3, 3], opts), Tensor::randn([2, 2], opts));
    let flat = Tensor::randn([2], opts);
    let wide = Tensor::randn([2, 3], opts);
    let cases: [(&[&Tensor], &str); 4] = [
        (&[], "ref_embeddings"),
        (&[&good, &narrow], "ref_embeddings"),
        (&[&good, &flat], "ref_embeddings"),
        // 3 + 3 rows against 5 labels.
        (&[&good, &good], "ref_labels"),
    ];
    for (parts, argument) in cases {
        let references = References {
            embeddings: parts,
            labels: &ref_labels,
            anchor_offset: None,
        };
        for mining in MININGS {
            let err = TripletConfig::new(0.2)
                .terms(mining, &labels, &x, Some(&references))
                .unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { argument: a, .. } if a == argument),
                "{parts:?}: {err}"
            );
        }
    }
    let references = References {
        embeddings: &[&good, &wide],
        labels: &ref_labels,
        anchor_offset: None,
    };
    for mining in MININGS {
        let terms = TripletConfig::new(0.2).terms(mining, &labels, &x, Some(&references));
        assert!(terms.is_ok(), "{mining:?}: {:?}", terms.err());
    }
}
