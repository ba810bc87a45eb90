"""``from_pretrained(release, sae_id)``: a published SAE by name, from the local Hugging Face cache or the Hub.

A release resolves through sae_lens's own pretrained directory when sae_lens is installed (its release names:
``gemma-scope-2b-pt-res-canonical``, ``gpt2-small-res-jb``, ...; nothing of that directory is copied here).
Without sae_lens a release is a Hugging Face repository id and ``sae_id`` the folder inside it. The folder is
taken from the local Hugging Face cache first (offline use) and downloaded only when it is not there, then
loaded by ``load_sae`` whatever its format (SAELens, Gemma Scope, sparsify, native).
"""

from __future__ import annotations

import os

from .files import load_sae
from .sae import SAE


def saelens_directory_entry(release: str, sae_id: str) -> tuple[str, str] | None:
    """(repository id, folder) of a sae_lens release name, or None when sae_lens is not installed."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        return None
    directory = get_pretrained_saes_directory()
    if release not in directory:
        return None
    entry = directory[release]
    saes = entry.saes_map
    if sae_id not in saes:
        some = ", ".join(list(saes)[:8])
        raise ValueError(f"sae_lens release {release!r} has no SAE {sae_id!r}; it has {len(saes)}, e.g. {some}.")
    return entry.repo_id, saes[sae_id]


def _snapshot(repo_id: str, folder: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [f"{folder.strip('/')}/*"] if folder else None
    try:
        root = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise
        root = snapshot_download(repo_id, allow_patterns=patterns)
    path = os.path.join(root, folder) if folder else root
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{repo_id} has no folder {folder!r} (looked in {root}).")
    return path


def from_pretrained(release: str, sae_id: str = "") -> SAE:
    """A published SAE: ``release`` (a sae_lens release name, or a Hugging Face repository id) and ``sae_id``
    (its SAE id in sae_lens's directory, or the folder in the repository)."""
    entry = saelens_directory_entry(release, sae_id)
    repo_id, folder = entry if entry is not None else (release, sae_id)
    if "/" not in repo_id:
        raise ValueError(
            f"{release!r} is not a sae_lens release here (sae_lens is {'not ' if entry is None else ''}installed) "
            f"and not a Hugging Face repository id ('org/name'). Install sae-lens to use its release names, pass the "
            f"repository id and folder (from_pretrained('google/gemma-scope-2b-pt-res', 'layer_12/width_16k/"
            f"average_l0_82')), or load a local folder with hooked_mlx.sae.load_sae(path).")
    try:
        path = _snapshot(repo_id, folder)
    except Exception as e:  # no cache entry and no network, or no such repository / folder
        raise FileNotFoundError(
            f"Could not find {repo_id}/{folder} in the local Hugging Face cache or download it ({type(e).__name__}: "
            f"{e}). Download it where the Hub is reachable (huggingface-cli download {repo_id} --include "
            f"'{folder}/*'), or load a local folder with hooked_mlx.sae.load_sae(path).") from e
    sae = load_sae(path)
    sae.cfg.extra.update({"release": release, "sae_id": sae_id, "repo_id": repo_id})
    return sae
