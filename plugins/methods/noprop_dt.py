"""NoProp-DT: the discrete-time variant of NoProp (Li, Teh, Pascanu 2025, section 2.2.1, Algorithm 1)."""

from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from noprop_bench import Method, UsageError, hookimpl
from noprop_bench_plugins.parts.block_offload import BlockOffload
from noprop_bench_plugins.parts.noprop import EMBEDDINGS
from noprop_bench_plugins.parts.noprop_dt_block import CosineSchedule, dt_chain
from noprop_bench_plugins.parts.noprop_dt_fm import require_non_negative, require_whole
from noprop_bench_plugins.parts.noprop_dt_parallel import parallel_runner, parallel_step
from noprop_bench_plugins.parts.optim import optimizer_options

SCHEDULES = ("sequential", "random", "parallel")


class NoPropDT(Method):
    """NoProp-DT: T blocks ``u_t(z_{t-1}, x)``, each trained only on its own local loss.

    One training step trains one block t (Algorithm 1), on one pass of its own backbone::

        loss_t = CE(classifier(z_T), y)                          z_T ~ q(z_T|y), the CE is on logits
               + KL(q(z_0|y) || N(0, I))                         closed form
               + T/2 * eta * (SNR(t) - SNR(t-1)) * mean ||u_t(z_{t-1}, x) - u_y||^2

    with ``z_{t-1} ~ q(z_{t-1}|y)`` detached. Block t has its own AdamW over its own parameters; the
    output classifier and a learned ``W_Embed`` are shared and have their own AdamW, stepped with
    every block's step, as Algorithm 1 updates theta_t, theta_out and W_Embed per mini-batch. No
    gradient crosses blocks: a block's loss never reaches another block's parameters.

    Block order (``schedule``):

    * ``sequential`` (default, the paper's): block 1 for one pass over the training data, then block 2,
      ..., block T, then block 1 again. The paper's outer loop over t, with its inner loop over all
      mini-batches, fits a time budget this way; ``block_samples`` changes the pass length.
    * ``random``: one block drawn uniformly per batch (the paper's "time steps could be sampled").
    * ``parallel``: every block on every batch, in one vectorised step (``parts/noprop_dt_parallel.py``);
      the shared classifier and embedding step once per batch.

    The budget counts the training batches fed, whatever the schedule: under ``sequential`` and
    ``random`` the harness's "epochs" are passes over the data summed over blocks (each block sees about
    ``epochs / T`` of its own); under ``parallel`` every block sees every batch, so each sees all of
    them. ``trial_metrics()`` gives the passes each block saw. A budget is not rounded to whole
    cycles: when some block got less than one pass over the training split (under a short budget,
    late blocks, block T included, may get none), the trial records a warning in
    ``method_metrics["warnings"]`` and the run prints it.

    Inference (Eq. 3): ``z_0 ~ N(0, I)``, ``z_t = a_t u_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps``
    for t = 1..T (``noise=false`` drops the eps term), then the classifier's logits on ``z_T``. It runs
    all T backbones, inherently: each block has its own image path.

    ``offload=true`` keeps every block but the one training (or, at inference, running) in host memory,
    with its AdamW state, and moves a block in for its turn; the moves happen inside ``train_step``, so
    the training clock counts them. The device then holds one block's parameters and moments instead of
    T (the memory the paper's DT claim rests on). It computes exactly what ``offload=false`` does.

    Choices the paper leaves open (section 7), all parameters: the fixed cosine schedule with
    ``cosine_offset=0.008`` squeezed into ``[abar_min, abar_max] = [0.001, 0.999]`` (see
    :class:`CosineSchedule`); constant learning rate; no gradient clipping. Memory: only one block's
    activations and gradients exist at a time, but all T blocks' parameters and AdamW moments stay
    resident on the device, and the harness's peak memory includes them.
    """

    name = "noprop_dt"
    label = "NoProp-DT"
    family = "discrete-time"
    stochastic = True
    defaults = {
        "embedding": "one-hot", "dim": 20, "blocks": 10, "eta": 0.1, "lr": 1e-3, "weight_decay": 1e-3,
        "schedule": "sequential", "block_samples": 0, "noise": True, "offload": False,
        "cosine_offset": 0.008, "abar_min": 1e-3, "abar_max": 0.999,
    }
    choices = {"embedding": EMBEDDINGS, "schedule": SCHEDULES}

    @classmethod
    def check_params(cls, params):
        super().check_params(params)
        require_whole(cls.name, params, ("dim", "blocks"))
        require_whole(cls.name, params, ("block_samples",), minimum=0)
        require_non_negative(cls.name, params, ("eta", "lr", "weight_decay", "cosine_offset"))
        if not 0.0 < params["abar_min"] < params["abar_max"] < 1.0:
            raise UsageError(f"method {cls.name!r}: needs 0 < abar_min < abar_max < 1, got "
                             f"abar_min={params['abar_min']}, abar_max={params['abar_max']}")
        for key in ("noise", "offload"):
            if not isinstance(params[key], bool):
                raise UsageError(f"method {cls.name!r}: {key}={params[key]!r} must be true or false")
        if params["offload"] and params["schedule"] == "parallel":
            raise UsageError(f"method {cls.name!r}: schedule=parallel trains every block at once, so it needs "
                             "them all on the device: it cannot be combined with offload=true")

    def __init__(self, task, **params):
        super().__init__(task, **params)
        type(self).check_params(self.params)
        p = self.params
        self.T = p["blocks"]
        self.embedding, blocks = dt_chain(task, p)
        self.schedule = CosineSchedule(self.T, p["cosine_offset"], p["abar_min"], p["abar_max"])
        self.blocks = blocks
        self.classifier = nn.Linear(self.embedding.dim, task.num_classes)
        self.to(task.device)

        def adamw(parameters):
            return torch.optim.AdamW(parameters, lr=p["lr"], weight_decay=p["weight_decay"],
                                     **optimizer_options(task.device))

        self.block_optimizers = [adamw(block.parameters()) for block in self.blocks]
        self.shared_optimizer = adamw(list(self.classifier.parameters()) + list(self.embedding.parameters()))
        self.offload = BlockOffload(self.blocks, self.block_optimizers, task.device) if p["offload"] else None
        # held here too, so the harness's warm-up puts the count back with the method's other counters
        self.block_move_count = self.offload.count if self.offload else None
        self.parallel = parallel_runner(self.blocks) if p["schedule"] == "parallel" else None

        self.train_size = len(task.train_images) if task.train_images is not None else 0
        self.pass_samples = p["block_samples"] or self.train_size
        if p["schedule"] == "sequential" and not self.pass_samples:
            raise UsageError(f"method {self.name!r}: schedule=sequential needs block_samples when the task "
                             "carries no training images")
        self.generator = torch.Generator().manual_seed(task.seed)
        self.current = 1  # the block that trains next under schedule=sequential
        self.samples_this_pass = 0
        self.block_steps = [0] * self.T
        self.block_samples_seen = [0] * self.T

    # -- training ---------------------------------------------------------------------------------
    def next_block(self) -> int:
        """The block (1..T) the next training step updates."""
        if self.params["schedule"] == "random":
            return int(torch.randint(self.T, (1,), generator=self.generator)) + 1
        return self.current

    def block_losses(self, t: int, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Block t's local loss (Algorithm 1), with one pass of block t's backbone only."""
        s = self.schedule
        W = self.embedding.weight
        u_y = W[y]
        with torch.no_grad():  # the block's input: no gradient may flow back through it
            z_prev = s.abar[t - 1].sqrt() * u_y + (1 - s.abar[t - 1]).sqrt() * torch.randn_like(u_y)
        weight = 0.5 * self.T * self.params["eta"] * s.snr_delta[t - 1]
        return self.losses_of_block(self.blocks[t - 1], x, y, z_prev, weight)

    def losses_of_block(self, block: nn.Module, x: torch.Tensor, y: torch.Tensor, z_prev: torch.Tensor,
                        weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """A block's loss terms given its noisy input ``z_prev`` and denoising weight. Nothing here depends on
        which block it is, so under ``--compile`` one graph serves all T blocks (see :meth:`compile_targets`)."""
        W = self.embedding.weight
        u_y = W[y]
        u_hat = block(block.features(x), z_prev, W)
        denoise = weight * (u_hat - u_y).pow(2).sum(dim=1).mean()
        terms = self.output_losses(u_y, y)
        return {"loss": terms["ce"] + terms["kl"] + denoise, **terms, "denoise": denoise}

    def output_losses(self, u_y: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The CE on a sampled ``z_T`` and the closed-form KL of ``q(z_0|y)``, shared by every block's loss."""
        s = self.schedule
        z_T = s.abar[-1].sqrt() * u_y + (1 - s.abar[-1]).sqrt() * torch.randn_like(u_y)
        ce = F.cross_entropy(self.classifier(z_T), y)
        abar_0 = s.abar[0]
        # KL(N(sqrt(abar0) u_y, (1 - abar0) I) || N(0, I))
        kl = 0.5 * (u_y.shape[1] * (-abar_0 - torch.log1p(-abar_0)) + abar_0 * u_y.pow(2).sum(dim=1)).mean()
        return {"ce": ce, "kl": kl}

    def train_step(self, x, y):
        if self.parallel is not None:  # schedule=parallel: every block on this batch, vectorised
            terms = self.parallel_update(x, y)
            for t in range(1, self.T + 1):
                self._count(t, len(y))
            return terms
        t = self.next_block()
        self._bring_in(t)
        terms = self.block_update(t, x, y)
        self._count(t, len(y))
        return terms

    def block_update(self, t: int, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Block t's update and the shared parameters' (the schedule's bookkeeping is ``train_step``'s)."""
        terms = self.block_losses(t, x, y)
        optimizers = (self.block_optimizers[t - 1], self.shared_optimizer)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        for optimizer in optimizers:
            optimizer.step()
        return {key: value.detach() for key, value in terms.items()}

    def warm_up_calls(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Every block's update once (the warm-up's train steps reach one block or a few), so under
        ``--compile`` on CUDA each block's recording is made before the clock starts."""
        if self.parallel is None and self.offload is None:
            for t in range(1, self.T + 1):
                self.block_update(t, x, y)

    def parallel_update(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``schedule=parallel``: every block's update on this batch at once."""
        return parallel_step(self, self.parallel, x, y)

    def _bring_in(self, t: int):
        """With ``offload``, block t on the device and the others on the host."""
        if self.offload is not None:
            self.offload.activate(t - 1)

    def _count(self, t: int, samples: int):
        self.block_steps[t - 1] += 1
        self.block_samples_seen[t - 1] += samples
        if self.params["schedule"] == "sequential":
            self.samples_this_pass += samples
            if self.samples_this_pass >= self.pass_samples:
                self.current = self.current % self.T + 1
                self.samples_this_pass = 0

    # -- inference --------------------------------------------------------------------------------
    def predict(self, x, noise=None, start_block=1):
        """Logits of the classifier on ``z_T`` from Eq. 3.

        ``noise`` (default: the ``noise`` parameter) keeps the ``sqrt(c_t) eps`` term. ``start_block=k``
        starts from ``z_{k-1} ~ N(0, I)`` and runs blocks k..T only (a diagnostic: with k = T, how much
        the last block classifies from the image alone).
        """
        return self.predict_from_features(self.features(x), noise, start_block)

    def features(self, x):
        """Every block's image path ``[B, T, width]``: independent of ``z``, so the harness computes it once
        for all inference runs and settings."""
        paths = []
        for t in range(1, self.T + 1):
            self._bring_in(t)
            paths.append(self.blocks[t - 1].features(x))
        return torch.stack(paths, dim=1)

    def predict_from_features(self, features, noise=None, start_block=1):
        noise, start_block = self._inference_setting(noise, start_block)
        s = self.schedule
        W = self.embedding.weight
        z = torch.randn(features.shape[0], W.shape[1], device=features.device)
        for t in range(start_block, self.T + 1):
            self._bring_in(t)
            z = s.a[t] * self.blocks[t - 1](features[:, t - 1].contiguous(), z, W) + s.b[t] * z
            if noise:
                z = z + s.c[t].sqrt() * torch.randn_like(z)
        return self.classifier(z)

    def _inference_setting(self, noise, start_block):
        noise = self.params["noise"] if noise is None else noise
        if not isinstance(noise, bool):
            raise UsageError(f"method {self.name!r}: noise={noise!r} must be true or false")
        if isinstance(start_block, bool) or not isinstance(start_block, int) or not 1 <= start_block <= self.T:
            raise UsageError(f"method {self.name!r}: start_block={start_block!r} must be a whole number in 1..{self.T}")
        return noise, start_block

    # -- host hooks -------------------------------------------------------------------------------
    def compile_targets(self) -> List[str]:
        """Under ``--compile``: the per-block loss and the inference chain. Compiling ``train_step`` would
        specialise on the block index and recompile for every block, on the training clock, until torch's
        recompile limit silently left the last blocks eager; ``schedule=parallel`` updates every block in
        one step, so its update is compiled whole."""
        if self.parallel is not None:
            return ["parallel_update", "predict_from_features"]
        return ["losses_of_block", "predict_from_features"]

    def capture_step_targets(self) -> List[str]:
        """Under ``--compile`` on CUDA: the update without the schedule's bookkeeping, one recording per block
        (a block's index is part of the call), or all blocks' at once with ``schedule=parallel``; nothing
        with ``offload``, which moves the blocks' parameters between steps."""
        if self.offload is not None:
            return []
        return ["parallel_update"] if self.parallel is not None else ["block_update"]

    def sweep_settings(self) -> List[dict]:
        """``--inference-sweep``: with and without the noise term."""
        return [{"noise": True}, {"noise": False}]

    def diagnostic_settings(self) -> Dict[str, dict]:
        """Run once per trial: the last block alone, from noise (section 8: a chain that does nothing)."""
        return {"last_block_only": {"start_block": self.T}}

    def trial_metrics(self):
        s = self.schedule
        per_block = sum(p.numel() for p in self.blocks[0].parameters())
        shared = sum(p.numel() for p in self.classifier.parameters()) + sum(
            p.numel() for p in self.embedding.parameters())
        size = self.train_size or None
        return {
            "schedule": self.params["schedule"], "blocks": self.T,
            "block_steps": list(self.block_steps), "block_samples": list(self.block_samples_seen),
            "passes_per_block": [n / size for n in self.block_samples_seen] if size else None,
            "abar": [float(v) for v in s.abar], "loss_weights": [float(v) * 0.5 * self.T * self.params["eta"]
                                                                 for v in s.snr_delta],
            "parameters_per_block": per_block, "parameters_shared": shared,
            "blocks_trained_per_step": self.T if self.parallel is not None else 1, "backbone_passes_per_train_step": 1,
            "backbone_passes_per_test_batch": self.T * (2 if self.params["embedding"] == "prototype" else 1),
            "memory_note": ("one block's activations, gradients, parameters and AdamW moments on the device at a "
                            "time; the other blocks wait in host memory" if self.offload else
                            "every block's activations and gradients at once (schedule=parallel), with all "
                            "blocks' parameters and AdamW moments: as much as training them end to end"
                            if self.parallel is not None else
                            "one block's activations and gradients at a time; all blocks' parameters and "
                            "AdamW moments stay resident, and count in the peak"),
            "block_moves": self.offload.moves if self.offload else 0,
            "warnings": self.short_budget_warnings(),
        }

    def short_budget_warnings(self) -> List[str]:
        """A warning when some block saw less than one pass over the training split (none when unknown)."""
        if not self.train_size:
            return []
        short = [t + 1 for t, n in enumerate(self.block_samples_seen) if n < self.train_size]
        if not short:
            return []
        return [f"block{'s' * (len(short) > 1)} {', '.join(map(str, short))} of {self.T} got less than one pass over the training split "
                f"each (passes per block: {', '.join(f'{n / self.train_size:.2f}' for n in self.block_samples_seen)}); "
                f"the chain is only partly trained; a budget of at least {self.epochs_for_one_pass_each()} epochs "
                f"gives every block one"]

    def epochs_for_one_pass_each(self) -> int:
        """The fewest whole epochs (passes summed over blocks) after which every block has seen the training
        split once: 1 under ``parallel``, about T under ``random``. ``sequential`` passes end on whole batches,
        so each is a little longer than the split and T epochs may fall short of the last block's pass."""
        steps = sum(self.block_steps)
        if self.params["schedule"] == "parallel":
            return 1
        if self.params["schedule"] == "random" or not steps:
            return self.T
        batch = sum(self.block_samples_seen) // steps  # every batch is whole
        pass_length = -(-self.pass_samples // batch) * batch  # samples a block trains on before the next takes over
        passes_each = -(-self.train_size // pass_length)
        # every block's passes but the last block's final one, which needs only the rest of the split
        needed = (passes_each * self.T - 1) * pass_length + self.train_size - (passes_each - 1) * pass_length
        return -(-needed // self.train_size)


@hookimpl
def register_methods(register):
    register(NoPropDT)
