"""One record per SAE architecture: what it is, and every fact about it that the package branches on (how it
activates at inference, whether it is trained here, its k and threshold, its parameters beyond the four shared
ones, and its names in SAELens and sparsify files). Code asks the record (``SAEConfig.arch``), never compares the
architecture's name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    #: the inference activation: "relu"; "topk" (the k largest relu'd per token); "threshold" (relu'd where above
    #: a per-latent threshold: JumpReLU's learned one, BatchTopK's running one); "gated" (a gate times a magnitude)
    inference: str
    #: SAETrainer trains it (the others are loaded from files, spliced, evaluated and exported)
    trainable: bool
    #: how training keeps latents: "row" (the k largest per token: TopK), "batch" (the k*B largest over the batch:
    #: BatchTopK), None (the activation alone, with a sparsity penalty)
    selection: str | None
    #: "learned": a trained per-latent parameter, kept >= 0 after each step (JumpReLU); "running": one global value
    #: from training statistics, frozen (BatchTopK); None: no threshold
    threshold: str | None
    #: the training sparsity penalty: "l1" (relu'd latents times decoder row norms; ghost grads may add a dead-latent
    #: loss), "l0" (straight-through step function), None (the selection fixes the sparsity; AuxK revives dead latents)
    sparsity: str | None
    #: the SAELens architecture an export writes
    saelens: str
    #: the prefix of SAELens's transcoder architectures for it ("" + "transcoder", "jumprelu_" + ...); None: SAELens
    #: has no transcoder of this kind
    saelens_transcoder: str | None
    #: sparsify's files can hold it
    sparsify: bool = False

    @property
    def uses_k(self) -> bool:
        """``cfg.k`` applies: k latents per token, or per token on average over the batch."""
        return self.selection is not None

    @property
    def gated(self) -> bool:
        """A gate path beside the magnitude path (parameters b_gate and r_mag; b_enc is the magnitude's bias)."""
        return self.inference == "gated"


_RECORDS = (
    Architecture("relu", "ReLU + L1 penalty weighted by decoder row norms (Anthropic April 2024); optional ghost grads",
                 inference="relu", trainable=True, selection=None, threshold=None, sparsity="l1", saelens="standard",
                 saelens_transcoder=""),
    Architecture("topk", "TopK (Gao et al. 2024): keep the k largest of relu(pre) per token; unit-norm decoder + AuxK",
                 inference="topk", trainable=True, selection="row", threshold=None, sparsity=None, saelens="topk",
                 saelens_transcoder=None, sparsify=True),
    Architecture("batchtopk", "BatchTopK (Bussmann et al. 2024): keep the k*B largest over the batch; JumpReLU at "
                 "inference with one running global threshold",
                 inference="threshold", trainable=True, selection="batch", threshold="running", sparsity=None,
                 saelens="jumprelu",
                 saelens_transcoder=None),
    Architecture("jumprelu", "JumpReLU (Rajamanoharan et al. 2024): per-latent threshold trained with straight-through "
                 "rectangle-kernel pseudo-gradients and an L0 penalty",
                 inference="threshold", trainable=True, selection=None, threshold="learned", sparsity="l0",
                 saelens="jumprelu",
                 saelens_transcoder="jumprelu_"),
    Architecture("gated", "Gated SAE (Rajamanoharan et al. 2024), as SAELens stores it: a gate (x @ W_enc + b_gate > 0) "
                 "times a magnitude relu(x @ (W_enc * exp(r_mag)) + b_mag); loaded, spliced, evaluated and exported, "
                 "not trained",
                 inference="gated", trainable=False, selection=None, threshold=None, sparsity=None, saelens="gated",
                 saelens_transcoder=None),
)

#: the records by name
ARCHS: dict[str, Architecture] = {a.name: a for a in _RECORDS}
#: the architectures, and what each means
ARCHITECTURES: dict[str, str] = {a.name: a.description for a in _RECORDS}
#: architectures the trainer trains (the others are loaded from files)
TRAINABLE_ARCHITECTURES = tuple(a.name for a in _RECORDS if a.trainable)
#: architectures with a k
TOPK_FAMILY = tuple(a.name for a in _RECORDS if a.uses_k)
