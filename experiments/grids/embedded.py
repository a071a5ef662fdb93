"""The embedded-dataset study of docs/experiments.md: 10 arms x 3 seeds = 30 runs.

    python experiments/sweep.py --grid=experiments/grids/embedded.py --workdir=workdirs/study

Fixed before the first run (the protocol is docs/experiments.md, "The embedded-dataset study"):
the default UNet and the demo's budget (600 AdamW steps of 8 random 64x128 crops), every
training field pinned below so that a later change of the defaults in configs/default.py does
not change the study. The arms, in the order each seed runs them:

* CE (MCCE);
* TCE at t in {1, 2, 5} (frequency prior, tau = 0): t is selected on validation;
* Stochastic TCE at t = 2, lam = 0.1, frequency prior, batches drawn uniformly: with the EMA
  estimate (``ema``) and with TERM's tilted running average (``tilted``);
* Stochastic TCE as TERM's solver: tilted running average, tilted class-aware sampling (uniform
  class prior, half the draw uniform), plain CE over the sampled batch (``sampling``);
* TCE with the uniform class prior at t = 1;
* class-weighted CE with median-frequency weights (from each batch);
* Lovász-softmax (classes present in the batch, whole batch).
"""

from experiments import sweep

STEPS = 600
COMMON = {
    "model.name": "unet",
    "global_batch_size": 8,
    "num_train_steps": STEPS,
    "optimizer.name": "adamw",
    "optimizer.learning_rate": 3e-3,
    "optimizer.weight_decay": 1e-4,
    "optimizer.schedule": "poly",
    "optimizer.warmup_steps": 50,
    "data.crop_size": [64, 128],
    "data.min_scale": 0.75,
    "data.max_scale": 1.5,
    "data.flip": True,
    "data.class_aware_sampling": False,
    "loss.tau": 0.0,
    "loss.class_weighting": "frequency",
    "loss.lam": 0.1,
    "loss.estimator": "ema",
    "loss.batch_loss": "tilted",
    "data.eval_batch_size": 16,
    "log_every_steps": 20,
    "eval_every_steps": STEPS,
    "checkpoint_every_steps": STEPS // 2,
}
TCE_T = (1.0, 2.0, 5.0)  # selected on validation (docs/experiments.md)
STOCHASTIC_T = 2.0  # the demo's tilt, fixed in advance
UNIFORM_PRIOR_T = 1.0


def stochastic_arm(name: str, overrides: dict) -> sweep.Arm:
    return sweep.Arm(name, {"loss.name": "stochastic_tce", "loss.t": STOCHASTIC_T, **overrides})


def get_grid() -> sweep.Grid:
    arms = [sweep.Arm("ce", {"loss.name": "ce"})]
    arms += sweep.make_arms(["tce"], TCE_T)
    arms += [
        stochastic_arm("stochastic_tce_ema", {"loss.estimator": "ema"}),
        stochastic_arm("stochastic_tce_tilted", {"loss.estimator": "tilted"}),
        stochastic_arm(
            "stochastic_tce_sampling",
            {
                "loss.estimator": "tilted",
                "loss.batch_loss": "ce",
                "data.class_aware_sampling": True,
                "data.sampling_prior": "uniform",
                "data.sampling_mix": 0.5,
                "data.sampling_refresh_steps": 20,
            },
        ),
        sweep.Arm(
            "tce_uniform_t1",
            {"loss.name": "tce", "loss.t": UNIFORM_PRIOR_T, "loss.class_weighting": "uniform"},
        ),
        sweep.Arm(
            "weighted_ce_median",
            {"loss.name": "weighted_ce", "loss.class_weights": "median_frequency"},
        ),
        sweep.Arm("lovasz", {"loss.name": "lovasz"}),
    ]
    return sweep.Grid(config="configs/default.py", arms=arms, seeds=(0, 1, 2), common=COMMON)
