"""Trackers on the official clients: `WandBCB` (Weights & Biases, `pip install 'miniai-learner[wandb]'`) and `MLflowCB` (MLflow,
`pip install 'miniai-learner[mlflow]'`). Each imports its client only when a fit starts, so `import miniai` stays fast. What
they record, and how a resumed fit goes on in the same run, is `TrackerCB`'s (`miniai.callbacks.trackers`)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .trackers import TrackerCB, import_client

__all__ = ['WandBCB', 'MLflowCB']


class WandBCB(TrackerCB):
    """Log the run to Weights & Biases (project `project`): settings as its config, losses and metrics as history at
    the training batch count, the best values and the time to target in its summary, files saved with the run.
    `mode='offline'` (or `WANDB_MODE=offline`) writes under `dir` for `wandb sync` later. Not the course's lesson 21
    `WandBCB`, which subclasses `MetricsCB` and runs here unchanged too."""
    client, extra = 'wandb', 'wandb'

    def __init__(self, project: str = 'miniai', dir: str | os.PathLike | None = None, mode: str | None = None,
                 entity: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.project, self.dir, self.mode, self.entity, self.run = project, dir, mode, entity, None

    def open(self, name: str | None, run_id: str | None, settings: dict) -> str:
        wandb = import_client('wandb', 'wandb')
        if self.dir is not None: Path(self.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, entity=self.entity, name=name, id=run_id, config=settings,
                              resume='allow' if run_id else None, dir=None if self.dir is None else str(self.dir),
                              mode=self.mode, reinit='create_new')
        return self.run.id

    # our own step (the training batches) for every value: a resumed offline run cannot ask the server for its step
    def send(self, values: dict, step: int) -> None: self.run.log(values, step=step)
    def set_summary(self, values: dict) -> None: self.run.summary.update(values)

    def upload(self, paths: list[Path]) -> None:
        for p in paths: self.run.save(str(p), base_path=str(p.parent), policy='now')

    def close(self, status: str) -> None:
        self.run.summary['status'] = status
        if status == 'interrupted': self.run.mark_preempting()
        self.run.finish(exit_code={'finished': 0, 'interrupted': 143}.get(status, 1))
        self.run = None


class MLflowCB(TrackerCB):
    """Log the run to MLflow, experiment `experiment` at `tracking_uri` (default: MLflow's own choice, the
    `MLFLOW_TRACKING_URI` variable or a local store): settings as params, losses and metrics at the training batch
    count, the best values and the time to target as metrics, files as artifacts; the run ends FINISHED, KILLED
    (interrupted) or FAILED. Uses an `MlflowClient` of its own: no global active run is started or changed."""
    client, extra = 'mlflow', 'mlflow'
    STATUS = {'finished': 'FINISHED', 'interrupted': 'KILLED', 'failed': 'FAILED'}

    def __init__(self, tracking_uri: str | None = None, experiment: str = 'miniai', **kw: Any) -> None:
        super().__init__(**kw)
        self.tracking_uri, self.experiment, self.mlflow = tracking_uri, experiment, None

    def open(self, name: str | None, run_id: str | None, settings: dict) -> str:
        from mlflow.entities import Param
        self.mlflow = import_client('mlflow', 'mlflow').MlflowClient(self.tracking_uri)
        if run_id is not None:  # going on: params are written once, and already are
            self.mlflow.update_run(run_id, status='RUNNING')
            return run_id
        exp = self.mlflow.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self.mlflow.create_experiment(self.experiment)
        run_id = self.mlflow.create_run(exp_id, run_name=name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in settings.items()]
        for i in range(0, len(params), 100): self.mlflow.log_batch(run_id, params=params[i:i + 100])
        return run_id  # pyright: ignore[reportReturnType]  (MLflow's run ids are strings)

    def send(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        self.mlflow.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])

    def set_summary(self, values: dict) -> None: self.send(values, self.batches)

    def upload(self, paths: list[Path]) -> None:
        for p in paths: self.mlflow.log_artifact(self.run_id, str(p))

    def close(self, status: str) -> None: self.mlflow.set_terminated(self.run_id, status=self.STATUS[status])
