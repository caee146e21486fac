"""Glance and focus on LSNet (GFNet, NeurIPS 2020 / T-PAMI): a cheap glance at the whole image, then crops.

Step 0 reads the whole image shrunk to ``glance_size`` with the global encoder; steps 1..T read ``patch_size`` crops
of the focus-resolution image with the local encoder, at centres proposed by an actor-critic patch policy (a
Gaussian over continuous centres in training, its mean at inference) or by a deterministic fallback (the glance's
most activated regions, in order). A GRU fuses the step features and gives logits and a style vector after every
step (anytime prediction). Crop centres are fractions (x, y) in [0, 1] of the focus image's width and height.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.distributions import Normal

from .lsnet import MODEL_ARGS, LSNet
from .lsnet_artist import ARTIST_MODEL_ARGS

__all__ = ["GlanceFocus", "PatchPolicy", "RecurrentClassifier", "GlanceFocusOutput", "Step", "BACKBONE_ARGS",
           "GF_MODELS", "create_glance_focus", "crop_patches", "most_activated_centres"]

BACKBONE_ARGS = {**MODEL_ARGS, **{k: v for k, v in ARTIST_MODEL_ARGS.items() if "img_size" not in v}}
POLICIES = ("learned", "sample", "random", "fallback")


def pool(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pool of an (N, C, H, W) map; an already pooled (N, C) tensor is returned as it is."""
    return feature_map if feature_map.ndim == 2 else F.adaptive_avg_pool2d(feature_map, 1).flatten(1)


class PatchPolicy(nn.Module):
    """Actor-critic on the current step's feature map and the GRU state: Gaussian over the next crop centre."""

    def __init__(self, in_chs: int, hidden_dim: int, grid: int = 2, std: float = 0.15):
        super().__init__()
        self.in_chs, self.grid, self.std = in_chs, grid, std
        state_dim = in_chs * grid * grid + hidden_dim
        self.actor = nn.Sequential(nn.Linear(state_dim, 256), nn.ReLU(), nn.Linear(256, 2))
        self.critic = nn.Sequential(nn.Linear(state_dim, 256), nn.ReLU(), nn.Linear(256, 1))

    def state(self, feature_map: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The policy's (detached) input: the map pooled to ``grid`` x ``grid`` cells, and the GRU state."""
        missing = self.in_chs - feature_map.shape[1]  # zero-pad a smaller encoder's channels
        cells = F.adaptive_avg_pool2d(F.pad(feature_map.detach().float(), (0, 0, 0, 0, 0, missing)), self.grid)
        return torch.cat([cells.flatten(1), hidden.detach().float()], dim=1)

    def forward(self, state: torch.Tensor) -> tuple[Normal, torch.Tensor]:
        """The Gaussian over centres (its mean in [0, 1]^2) and the critic's value, for states (N, state_dim)."""
        mean = torch.sigmoid(self.actor(state))
        return Normal(mean, torch.full_like(mean, self.std)), self.critic(state).squeeze(1)

    @staticmethod
    def log_prob(dist: Normal, centres: torch.Tensor) -> torch.Tensor:
        """Log-probability of (N, 2) centres under ``dist``, summed over x and y."""
        return dist.log_prob(centres).sum(1)


class RecurrentClassifier(nn.Module):
    """GRU over the step features (global and local encoders projected to one size): logits and style vectors."""

    def __init__(self, global_dim: int, local_dim: int, hidden_dim: int, num_classes: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.project_global = nn.Sequential(nn.Linear(global_dim, hidden_dim), nn.ReLU())
        self.project_local = nn.Sequential(nn.Linear(local_dim, hidden_dim), nn.ReLU())
        self.gru = nn.GRUCell(hidden_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, feature: torch.Tensor, hidden: torch.Tensor | None, is_glance: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: the new hidden state (the style vector) and its logits."""
        x = (self.project_global if is_glance else self.project_local)(feature)
        hidden = self.gru(x, hidden)
        return hidden, self.head(hidden)


def crop_patches(images: torch.Tensor, centres: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` x ``size`` crops of (N, C, H, W) images at (N, 2) centres in [0, 1]; boxes (N, 4) as x0, y0, x1, y1.

    A crop never leaves the image (its centre is moved inwards); a side shorter than ``size`` is read whole and
    zero-padded (zero is the mean colour after normalisation), its box covering the whole side.
    """
    n, c, h, w = images.shape
    centres = centres.detach().clamp(0, 1)
    x0 = (centres[:, 0] * w - size / 2).round().clamp(min=0).clamp(max=max(w - size, 0)).long()
    y0 = (centres[:, 1] * h - size / 2).round().clamp(min=0).clamp(max=max(h - size, 0)).long()
    patches = images.new_zeros(n, c, size, size)
    ch, cw = min(h, size), min(w, size)
    for i in range(n):
        patches[i, :, :ch, :cw] = images[i, :, y0[i]:y0[i] + ch, x0[i]:x0[i] + cw]
    boxes = torch.stack([x0, y0, x0 + cw, y0 + ch], dim=1)
    return patches, boxes


def most_activated_centres(feature_map: torch.Tensor, steps: int) -> torch.Tensor:
    """Fallback policy: centres (steps, N, 2) of the ``steps`` most activated cells of the glance's map, best first.

    Activation is the channel mean of the map upsampled to at least 4 x 4 cells; fewer cells than steps repeat.
    """
    act = feature_map.detach().float().mean(1, keepdim=True)
    size = (max(act.shape[2], 4), max(act.shape[3], 4))
    act = F.interpolate(act, size=size, mode="bilinear", align_corners=False).flatten(1)
    order = act.argsort(dim=1, descending=True)
    order = order[:, torch.arange(steps, device=order.device) % order.shape[1]]
    ys, xs = order // size[1], order % size[1]
    centres = torch.stack([(xs.float() + 0.5) / size[1], (ys.float() + 0.5) / size[0]], dim=2)
    return centres.transpose(0, 1)


@dataclass
class GlanceFocusOutput:
    """Per-step outputs: logits (T+1, N, K), styles (T+1, N, D), centres/boxes (T, N, ...) of the focus steps;
    with a learned or sampled policy also log-probs, entropies, values (T, N) and policy states (T, N, S)."""

    logits: torch.Tensor
    styles: torch.Tensor
    centres: torch.Tensor
    boxes: torch.Tensor
    log_probs: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    values: torch.Tensor | None = None
    states: torch.Tensor | None = None


@dataclass
class Step:
    """One step for a batch: logits (N, K), style (N, D); for focus steps the crop centre (N, 2) and box (N, 4)
    in focus pixels, and with a learned or sampled policy its state, log-prob, entropy and value."""

    logits: torch.Tensor
    style: torch.Tensor
    centre: torch.Tensor | None = None
    box: torch.Tensor | None = None
    state: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    value: torch.Tensor | None = None


class GlanceFocus(nn.Module):
    """Global and local LSNet encoders, a patch policy and a recurrent classifier (see the module docstring)."""

    def __init__(self, num_classes: int = 1000, backbone: str = "lsnet_t", local_backbone: str | None = None,
                 glance_size: int = 128, patch_size: int = 96, focus_resolution: int = 672, focus_steps: int = 4,
                 hidden_dim: int = 256, policy_std: float = 0.15, **kwargs):
        super().__init__()
        self.num_classes, self.glance_size, self.patch_size = num_classes, glance_size, patch_size
        self.focus_resolution, self.focus_steps = focus_resolution, focus_steps
        self.backbone, self.local_backbone = backbone, local_backbone or backbone
        self.global_encoder = LSNet(num_classes=0, **BACKBONE_ARGS[self.backbone])
        self.local_encoder = LSNet(num_classes=0, **BACKBONE_ARGS[self.local_backbone])
        self.classifier = RecurrentClassifier(self.global_encoder.num_features, self.local_encoder.num_features,
                                              hidden_dim, num_classes)
        self.policy = PatchPolicy(max(self.global_encoder.num_features, self.local_encoder.num_features),
                                  hidden_dim, std=policy_std)
        self.head_hidden_size = self.num_features = hidden_dim  # the style vector (GRU state)
        self.use_projection = self.distillation = False
        self.pretrained_cfg = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}

    def encode(self, images: torch.Tensor, is_glance: bool) -> torch.Tensor:
        """The last feature map of the global (glance) or local (crop) encoder."""
        return (self.global_encoder if is_glance else self.local_encoder).forward_features(images)

    def iter_steps(self, glance: torch.Tensor, focus: torch.Tensor, steps: int | None = None,
                   policy: str = "learned", centres: torch.Tensor | None = None) -> Iterator[Step]:
        """Yield the glance step, then up to ``steps`` focus steps (default ``focus_steps``): stop early at will.

        ``policy``: ``learned`` (the policy's mean), ``sample`` (Gaussian samples, for PPO), ``random`` (uniform
        centres, stage 1) or ``fallback`` (the glance's most activated regions); ``centres`` (T, N, 2) overrides.
        """
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        steps = self.focus_steps if steps is None else steps
        fmap = self.encode(glance, True)
        hidden, logits = self.classifier(pool(fmap), None, True)
        yield Step(logits, hidden)
        if centres is None and policy == "fallback":
            centres = most_activated_centres(fmap, steps)
        for t in range(steps):
            step = Step(logits, hidden)
            if centres is not None:
                centre = centres[t]
            elif policy == "random":
                centre = torch.rand(glance.shape[0], 2, device=glance.device)
            else:
                step.state = self.policy.state(fmap, hidden)
                dist, step.value = self.policy(step.state)
                centre = dist.sample() if policy == "sample" else dist.mean
                step.log_prob, step.entropy = dist.log_prob(centre).sum(1), dist.entropy().sum(1)
            patches, step.box = crop_patches(focus, centre, self.patch_size)
            fmap = self.encode(patches, False)
            step.style, step.logits = self.classifier(pool(fmap), hidden, False)
            hidden, step.centre = step.style, centre
            yield step

    def forward(self, glance: torch.Tensor, focus: torch.Tensor, steps: int | None = None,
                policy: str = "learned", centres: torch.Tensor | None = None) -> GlanceFocusOutput:
        """All steps of :meth:`iter_steps`, stacked."""
        first, *rest = self.iter_steps(glance, focus, steps, policy, centres)
        def stack(name: str) -> torch.Tensor | None:
            values = [getattr(s, name) for s in rest]
            return torch.stack(values) if values and values[0] is not None else None
        n = glance.shape[0]
        return GlanceFocusOutput(
            torch.stack([first.logits, *(s.logits for s in rest)]),
            torch.stack([first.style, *(s.style for s in rest)]),
            stack("centre") if rest else glance.new_zeros(0, n, 2),
            stack("box") if rest else torch.zeros(0, n, 4, dtype=torch.long, device=glance.device),
            stack("log_prob"), stack("entropy"), stack("value"), stack("state"))


GF_MODELS = {"lsnet_t_gf": "lsnet_t", "lsnet_s_gf": "lsnet_s", "lsnet_b_gf": "lsnet_b"}  # name -> both encoders


def create_glance_focus(model_name: str, num_classes: int = 1000, **kwargs) -> GlanceFocus:
    """The glance-and-focus model ``model_name`` (a :data:`GF_MODELS` name) with two encoders of its size.

    These names are the project's own, not timm's: the models read an image pair (glance, focus), have no
    pretrained weights and no ``pretrained_cfg``, so registering them with timm would break timm's model contract.
    Initialise the encoders with ``train_glance_focus.py --init-from MODEL_FOLDER``.
    """
    if model_name not in GF_MODELS:
        raise ValueError(f"unknown glance-and-focus model {model_name!r}; use one of {', '.join(GF_MODELS)}")
    return GlanceFocus(num_classes=num_classes, backbone=GF_MODELS[model_name], **kwargs)
