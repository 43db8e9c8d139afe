"""Every configuration key flowmap knows, with its default. Other configs start from this one.

Override any key on the command line: `python main.py --config configs/X.py
--config.train.steps=1000`. Unknown keys are an error (exit code 2), so a typo never
silently falls back to a default.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""               # a features dataset (extract_features.py or the demo)
  c.data.source = ""            # the stored feature to condition on
  c.data.target = ""            # the stored feature to generate
  c.data.normalize = "standardize"   # standardize | l2 (norm sqrt(dim)) | unit (norm 1) | none
  c.data.renormalize = False    # resume in the dataset's new statistics when they changed
  c.data.overfit_size = 0       # > 0: train and evaluate on the first N training examples
  c.data.source_shape = ml_collections.config_dict.placeholder(tuple)  # (tokens, dim)
  c.data.target_shape = ml_collections.config_dict.placeholder(tuple)
  c.data.shuffle_buffer_mb = 512   # host memory for shuffling a streamed split: about
                                # three windows of serialised records, each at least one
                                # batch; more buys I/O slack on a GPU node, not more mixing
  c.data.in_memory_gb = 2.0     # a training split up to this size (stored dtype) is held in
                                # memory and permuted exactly; larger ones stream (0: always)
  c.data.synthetic = ml_collections.ConfigDict()   # used when data.dir is empty (the demo)
  c.data.synthetic.train_size = 4096
  c.data.synthetic.validation_size = 512
  c.data.synthetic.grid = 4
  c.data.synthetic.source_dim = 48
  c.data.synthetic.target_dim = 32
  c.data.synthetic.target_scale = 1.0   # the demo's target values times this (their raw scale)

  c.model = ml_collections.ConfigDict()
  c.model.size = "small"        # tiny | small | base | large | blip3o
  c.model.dim = 0               # > 0 overrides the named size
  c.model.depth = 0
  c.model.heads = 0
  c.model.kv_heads = 0          # grouped-query attention: fewer KV heads than heads
  c.model.mlp_ratio = 4.0
  c.model.dtype = "auto"        # compute dtype (auto: bfloat16 on GPUs and on CPUs with native
                                # bfloat16 matmuls, float32 elsewhere); parameters float32
  c.model.remat = "none"        # none | full | dots | dots_no_batch
  c.model.aligned_conditioning = True   # add the source, resampled onto the target's token
                                # layout, at each target position (any two layouts)
  c.model.prior = "auto"        # the estimate of the target the model corrects, fitted on
                                # eval.baseline_rows training rows: auto (the linear map or
                                # the MLP, whichever is better on held-out rows) | linear |
                                # mlp | none (the bare network)
  c.model.prior_mlp_steps = 8000   # the MLP's Adam steps (the prior's and the ladder's MLP
                                # rung), early-stopped on a tenth of its rows
  c.model.attention = "auto"    # auto (cudnn on GPUs in bf16/fp16, flash on CPUs, else xla)
                                # | xla | einsum (the plain reference) | flash | cudnn
  c.model.scan_unroll = 1       # blocks per scan iteration: 1 compiles one block (fastest
                                # compile); depth removes the loop's stacking copies

  c.flow = ml_collections.ConfigDict()
  c.flow.objective = "flow"     # flow (rectified flow) | meanflow (average velocities: samples
                                # in 1-2 evaluations) | regression (the same network
                                # fitted to the target with MSE: a mean, no samples)
  c.flow.time_sampling = "logit_normal"  # uniform | logit_normal | shifted
  c.flow.mean_fraction = 0.0    # share of examples trained at t = 0 (the mean mode's time)
  c.flow.interval_fraction = 0.25   # meanflow: share of examples with a real interval (the
                                # rest train the instantaneous velocity, as flow does)
  c.flow.adaptive_power = 1.0   # meanflow: loss weight 1 / (error + 1e-3)^power (0: plain MSE)
  c.flow.logit_mean = 0.0
  c.flow.logit_std = 1.0
  c.flow.shift = 1.0
  c.flow.loss_scale = 1.0
  c.flow.cond_dropout = 0.1     # share of examples trained without source (for guidance)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100_000
  c.train.batch_size = 256      # global batch, over all devices and hosts
  c.train.lr = 3e-4
  c.train.warmup_steps = 1000
  c.train.min_lr_ratio = 0.0    # cosine decay to lr * min_lr_ratio
  c.train.weight_decay = 0.01
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.999
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.select_rows = 0       # > 0: hold this many training rows out of training (the last
                                # share of every shard) and keep, in <workdir>/selected/, the
                                # EMA weights whose mean scores the lowest MSE on them, from
                                # step 0 (the linear map itself) on; for small data
  c.train.grad_accum = 1
  c.train.skip_nonfinite = False   # True: skip non-finite updates instead of stopping
  c.train.max_nonfinite_in_a_row = 10

  c.eval = ml_collections.ConfigDict()
  c.eval.num_images = 512
  c.eval.solver = "euler"       # euler | heun (Euler matched or beat Heun at equal model
                                # evaluations on every task measured with a prior)
  c.eval.steps = 8              # model evaluations per sample in the periodic evaluation
  c.eval.guidance = 1.0         # classifier-free guidance scale (1 = off)
  c.eval.mode = "sample"        # sample | mean: the output that eval/* scores (both are
                                # reported under eval/sample/* and eval/mean/*)
  c.eval.mean_draws = 4         # the mean: one-step estimates from this many noise draws,
                                # averaged (that many model evaluations)
  c.eval.num_samples = 4        # samples per image for the energy score in --mode eval
  c.eval.batch_size = 128
  c.eval.baseline_rows = 16384  # training rows (spread over the split) that the prior and
                                # the baseline ladder are fitted on (cached) ...
  c.eval.baseline_mb = 512.0    # ... at most this many MiB of them in their stored dtype
                                # (256 x 1024 on both sides in float16: 512 rows)
  c.eval.baselines = ("procrustes", "mlp")   # rungs fitted next to the mean and the ridge
  c.eval.sweep_solvers = ("euler", "heun")                 # --mode eval sweeps these
  c.eval.sweep_evaluations = (1, 2, 4, 8, 16, 32, 50)      # model evaluations per sample
  c.eval.sweep_guidances = ()   # guidance scales swept besides 1 (needs flow.cond_dropout > 0)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1              # -1: every device not used by fsdp
  c.mesh.fsdp = 1

  c.map = ml_collections.ConfigDict()
  c.map.input = ""
  c.map.output = ""
  c.map.mode = "sample"         # sample | mean (see eval.mode)
  c.map.suffix = "_mapped"      # the mapped feature is stored as <data.target><suffix>
  c.map.batch_size = 256
  c.map.ema = True              # False: map with the raw (non-EMA) weights

  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ""          # empty: no W&B
  return c
