"""The PyTorch peer of ``python -m flowmap.benchmark --peer lumina``: diffusers'
LuminaNextDiT2DModel (what BLIP3-o trains) at flowmap's size, trained and sampled the plain
PyTorch way (eager, AdamW, gradient clipping, EMA, an Euler loop), on the machine the
benchmark runs on: a CUDA GPU when PyTorch sees one, else the CPU with PyTorch's threads.

Matched: hidden size, layers and heads of the config, the target tokens as a square image with
patch size 1, the target dim as channels, the source tokens as its caption features. Two
precisions: float32 and bfloat16 autocast (on CPUs without AVX512_BF16 or AMX, autocast
emulates bfloat16 and runs many times slower than float32; the benchmark caps its time with
bench.budget_s and bench.max_call_s). Its packages are in requirements-bench.txt.
"""

from __future__ import annotations

import math

PRECISIONS = ("float32", "bf16_autocast")


class LuminaPeer:
  """diffusers' LuminaNextDiT2DModel sized like ``model_cfg`` (a flowmap ModelConfig).

  Raises ValueError for a config the peer cannot match (a target that is not a square grid,
  grouped KV heads)."""

  def __init__(self, config, model_cfg, sample_batch: int):
    from flowmap import encoders   # noqa: F401  (lets diffusers import torchvision)
    import diffusers
    import torch
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    self.torch = torch
    (ns, ds), (nt, dt) = model_cfg.source_shape, model_cfg.target_shape
    side = math.isqrt(nt)
    if side * side != nt or nt == 1:
      raise ValueError(f"--peer lumina needs the target tokens on a square grid; got "
                       f"{nt} tokens")
    if model_cfg.kv_heads != model_cfg.heads:
      raise ValueError("--peer lumina is matched without grouped KV heads; set "
                       "model.kv_heads to model.heads")
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    self.model = diffusers.LuminaNextDiT2DModel(
        sample_size=side, patch_size=1, in_channels=dt, hidden_size=model_cfg.dim,
        num_layers=model_cfg.depth, num_attention_heads=model_cfg.heads,
        num_kv_heads=model_cfg.kv_heads, multiple_of=64, learn_sigma=False, qk_norm=True,
        cross_attention_dim=ds).to(self.device)
    with torch.no_grad():
      self.model.pad_token.zero_()   # allocated uninitialised, unused at one resolution
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    t = config.train
    self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=(0.9, t.b2), eps=1e-8,
                                       weight_decay=t.weight_decay)
    self.grad_clip, self.ema_decay = t.grad_clip, t.ema_decay
    self.rope = get_2d_rotary_pos_embed_lumina(model_cfg.dim // model_cfg.heads, side,
                                               side).to(self.device)
    b = config.train.batch_size
    gen = torch.Generator().manual_seed(config.seed)
    on = lambda x: x.to(self.device)
    self.x1 = on(torch.randn(b, dt, side, side, generator=gen))
    self.source = on(torch.randn(b, ns, ds, generator=gen))
    self.mask = on(torch.ones(b, ns, dtype=torch.int32))
    self.sample_source = on(torch.randn(sample_batch, ns, ds, generator=gen))
    self.sample_mask = on(torch.ones(sample_batch, ns, dtype=torch.int32))
    self.sample_noise = on(torch.randn(sample_batch, dt, side, side, generator=gen))
    self.version = diffusers.__version__
    self.num_params = sum(p.numel() for p in self.params)

  def describe(self) -> dict:
    torch = self.torch
    return {"name": "diffusers.LuminaNextDiT2DModel", "diffusers": self.version,
            "torch": torch.__version__, "device": str(self.device),
            "torch_threads": torch.get_num_threads(), "params": self.num_params}

  def _autocast(self, precision: str):
    return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16,
                               enabled=precision == "bf16_autocast")

  def _velocity(self, x, t, source, mask, precision):
    with self._autocast(precision):
      out = self.model(x, t, source, mask, self.rope, cross_attention_kwargs={},
                       return_dict=False)[0]
    return out.float()

  def train_steps(self, n: int, precision: str) -> None:
    torch = self.torch
    self.model.train()
    for _ in range(n):
      b = self.x1.shape[0]
      t = torch.sigmoid(torch.randn(b, device=self.device))
      noise = torch.randn_like(self.x1)
      tb = t[:, None, None, None]
      xt = (1 - tb) * noise + tb * self.x1
      pred = self._velocity(xt, t, self.source, self.mask, precision)
      loss = torch.mean(torch.square(pred - (self.x1 - noise)))
      self.optimizer.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
      self.optimizer.step()
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
      loss.item()   # waits for the step, as flowmap's timing does

  def flops_per_example(self) -> dict:
    """The peer's matmul and attention FLOPs per example, counted by PyTorch's FlopCounterMode
    over one forward and one forward-and-backward pass (float32)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch, b = self.torch, self.x1.shape[0]
    t = torch.full((b,), 0.5, device=self.device)
    with FlopCounterMode(display=False) as counter:
      with torch.no_grad():
        self._velocity(self.x1, t, self.source, self.mask, "float32")
    forward = counter.get_total_flops() / b
    with FlopCounterMode(display=False) as counter:
      self._velocity(self.x1, t, self.source, self.mask, "float32").sum().backward()
    self.optimizer.zero_grad(set_to_none=True)
    return {"forward": forward, "train": counter.get_total_flops() / b}

  def euler(self, evaluations: int, precision: str) -> None:
    torch = self.torch
    self.model.eval()
    x = self.sample_noise
    b = x.shape[0]
    with torch.inference_mode():
      for i in range(evaluations):
        t = torch.full((b,), i / evaluations, device=self.device)
        x = x + self._velocity(x, t, self.sample_source, self.sample_mask,
                               precision) / evaluations
      x.cpu()   # waits for the loop
