"""Sparse autoencoders on hooked_mlx activations: config, models, data, training, evaluation, files, analysis.

Quick start::

    from hooked_mlx import HookedTransformer
    from hooked_mlx.sae import SAEConfig, ActivationStore, train_sae, evaluate_reconstruction, save_sae

    model = HookedTransformer.from_pretrained("../shared/models/stories260K")
    cfg = SAEConfig(architecture="topk", hook_name="blocks.2.hook_resid_post", expansion_factor=16, k=16,
                    training_tokens=2_000_000)
    store = ActivationStore(model, cfg.hook_name, "stories.txt", cfg)
    sae = train_sae(cfg, store)
    save_sae(sae, "out/sae")

Metric keys are the constants of ``hooked_mlx.sae.metrics``; every default lives in ``SAEConfig``.
"""

from . import metrics
from .analysis import (
                       FeatureExample,
                       LogitEffects,
                       TokenFeatures,
                       feature_logit_effects,
                       feature_logit_weights,
                       top_contexts,
                       top_features,
)
from .config import ARCHITECTURES, SAEConfig
from .evals import evaluate_model, evaluate_reconstruction
from .files import (
                       detect_format,
                       export_saelens,
                       export_sparsify,
                       load_sae,
                       load_saelens,
                       load_sparsify,
                       save_sae,
)
from .gemma_scope import load_gemma_scope
from .pretrained import from_pretrained
from .sae import SAE
from .splice import HookedSAETransformer
from .store import ActivationStore, ArraySource, ShardSource, harvest, open_corpus
from .training import (
                       NonFiniteLossError,
                       SAETrainer,
                       geometric_median,
                       load_checkpoint,
                       save_checkpoint,
                       train_sae,
                       train_saes,
)

__all__ = [
    "ARCHITECTURES", "ActivationStore", "ArraySource", "FeatureExample", "HookedSAETransformer", "LogitEffects",
    "NonFiniteLossError",
    "SAE", "SAEConfig", "SAETrainer", "ShardSource", "TokenFeatures", "detect_format", "evaluate_model",
    "evaluate_reconstruction", "export_saelens", "export_sparsify", "feature_logit_effects",
    "feature_logit_weights", "from_pretrained", "geometric_median", "harvest", "load_checkpoint", "load_gemma_scope", "load_sae", "load_saelens",
    "load_sparsify", "metrics", "open_corpus", "save_checkpoint", "save_sae", "top_contexts", "top_features",
    "train_sae", "train_saes",
]
