"""The embedded-dataset study of docs/experiments.md: 10 losses/tilts x 3 seeds = 30 runs.

    python experiments/sweep.py --grid=experiments/grids/embedded.py --workdir=workdirs/study

Fixed before any run of the study, from the compute budget alone (about an hour on 2 shared CPU
cores): the small UNet, batches of 8 crops of 64x128, 600 steps (4.8 epochs of the 1000
training images), every training hyper-parameter pinned below so that a later change of the
defaults in configs/default.py does not change the study. The arms:

* CE (MCCE);
* TCE at t in {0.5, 1, 2, 5} (frequency prior, tau = 0);
* Stochastic TCE at t in {1, 5} (lam = 0.1, frequency prior, no class-aware sampling);
* class-weighted CE with median-frequency balancing (Eigen & Fergus; weights from the batch);
* softmax focal loss, gamma = 2;
* Lovász-softmax (Berman et al., classes present in the batch, whole batch).
"""

from experiments import sweep

STEPS = 600
COMMON = {
    "model.name": "unet_small",
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
    "data.eval_batch_size": 16,
    "log_every_steps": 20,
    "eval_every_steps": STEPS,
    "checkpoint_every_steps": STEPS // 2,
}
TCE_T = (0.5, 1.0, 2.0, 5.0)
STOCHASTIC_T = (1.0, 5.0)


def get_grid() -> sweep.Grid:
    arms = [sweep.Arm("ce", {"loss.name": "ce"})]
    arms += sweep.make_arms(["tce"], TCE_T)
    arms += [
        sweep.Arm(f"stochastic_tce_t{sweep.format_number(t)}",
                  {"loss.name": "stochastic_tce", "loss.t": t})
        for t in STOCHASTIC_T
    ]
    arms += [
        sweep.Arm("weighted_ce_median",
                  {"loss.name": "weighted_ce", "loss.class_weights": "median_frequency"}),
        sweep.Arm("focal", {"loss.name": "focal", "loss.focal_gamma": 2.0}),
        sweep.Arm("lovasz", {"loss.name": "lovasz"}),
    ]
    return sweep.Grid(config="configs/default.py", arms=arms, seeds=(0, 1, 2), common=COMMON)
