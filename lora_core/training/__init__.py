"""The training run: the loop and everything it turns (objectives, schedules, optimizers, order, seeds).

Entry points: `loop.train` with `loop.TrainConfig` / `loop.TrainingData`, `denoiser.Denoiser` (the model
protocol the glue implements), `objectives.ObjectiveConfig`, `optim.make_optimizer`, `plan.BatchPlan`.
"""
