"""AttributionMetric inside a tiny Avalanche run (2 experiences, 4 classes, random tensors)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
avalanche = pytest.importorskip("avalanche")

from avalanche.benchmarks import class_incremental_benchmark  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.logging import (  # noqa: E402
    CSVLogger,
    InteractiveLogger,
    TensorboardLogger,
    TextLogger,
)
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.supervised import Naive  # noqa: E402

from lorax_cil.evaluation.metrics import AccuracyMatrix  # noqa: E402
from lorax_cil.training.avalanche_metrics import (  # noqa: E402
    AttributionMetric,
    attribution_metrics,
)

CLASS_IS_FAKE = np.array([False, True, False, True])  # real_t = 2t, fake_t = 2t + 1
CLASS_TASK = np.array([0, 0, 1, 1])


class _TensorSet(torch.utils.data.Dataset):
    """Plain torch dataset with a ``targets`` list (avalanche's "new-TA" flavour)."""

    def __init__(self, x, y):
        self.x = x
        self.targets = [int(v) for v in y]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def _benchmark(seed=0, per_class=(24, 12)):
    g = torch.Generator().manual_seed(seed)
    splits = {}
    for name, n in zip(("train", "test"), per_class):
        y = torch.arange(4).repeat_interleave(n)
        x = torch.randn(len(y), 3, 4, 4, generator=g) + 0.7 * y.view(-1, 1, 1, 1).float()
        splits[name] = _TensorSet(x, y)
    return class_incremental_benchmark(splits, class_order=[0, 1, 2, 3], num_classes_per_exp=[2, 2])


class _Collector(SupervisedPlugin):
    """Independent record of eval predictions, keyed by (completed steps - 1, experience)."""

    def __init__(self):
        super().__init__()
        self.done = 0
        self.by_key = {}

    def after_training_exp(self, strategy, **kwargs):
        self.done += 1

    def before_eval_exp(self, strategy, **kwargs):
        self.preds, self.labels = [], []

    def after_eval_iteration(self, strategy, **kwargs):
        self.preds.append(strategy.mb_output.argmax(1).cpu().numpy())
        self.labels.append(strategy.mb_y.cpu().numpy())

    def after_eval_exp(self, strategy, **kwargs):
        key = (self.done - 1, strategy.experience.current_experience)
        self.by_key[key] = (np.concatenate(self.preds), np.concatenate(self.labels))


def _multi_real_by_hand(pred, label):
    real_label = ~CLASS_IS_FAKE[label]
    ok = np.where(real_label, ~CLASS_IS_FAKE[pred], pred == label)
    return ok.mean()


def _strategy(metric, loggers, plugins=(), **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4))
    evaluator = EvaluationPlugin(metric, loggers=loggers)
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                 criterion=torch.nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1,
                 eval_mb_size=32, device="cpu", evaluator=evaluator, plugins=list(plugins),
                 **kwargs)


def test_attribution_metric_in_a_tiny_run(tmp_path):
    bm = _benchmark()
    (metric,) = attribution_metrics(
        class_tables=lambda: (CLASS_IS_FAKE, CLASS_TASK), task_names=["gen_a", "gen_b"]
    )
    text = io.StringIO()
    csv_logger = CSVLogger(log_folder=str(tmp_path / "csv"))
    loggers = [InteractiveLogger(), TextLogger(text), csv_logger,
               TensorboardLogger(tb_log_dir=str(tmp_path / "tb"))]
    collector = _Collector()
    strategy = _strategy(metric, loggers, plugins=[collector])

    strategy.eval(bm.test_stream)  # before any training: must not crash, must not fill a row
    assert metric.history[-1]["step"] == -1
    for exp in bm.train_stream:
        strategy.train(exp)
        strategy.eval(bm.test_stream)
    csv_logger.close()

    R = metric.accuracy_matrix("multi_real")
    assert isinstance(R, AccuracyMatrix) and R.task_names == ("gen_a", "gen_b")
    m = R.matrix
    assert m.shape == (2, 2)
    assert math.isnan(m[0, 1])  # task 1 not trained after step 0
    lower = m[np.tril_indices(2)]
    assert np.isfinite(lower).all() and ((lower >= 0) & (lower <= 1)).all()
    for (j, i), v in np.ndenumerate(m):
        if j >= i:
            assert v == pytest.approx(_multi_real_by_hand(*collector.by_key[(j, i)]))
    for quantity in ("binary", "strict", "ap"):
        assert metric.accuracy_matrix(quantity).matrix.shape == (2, 2)
    assert metric.matrix == R
    assert set(R.summary()) == {"aa", "step_average_accuracy", "bwt", "forgetting"}

    last = strategy.evaluator.get_last_metrics()
    for name in ("Top1_MultiReal_Exp", "Top1_Binary_Exp", "Top1_Strict_Exp", "AP_Fakeness_Exp"):
        assert f"{name}/eval_phase/test_stream/Exp001" in last
    assert last["Top1_MultiReal_Exp/eval_phase/test_stream/Exp000"] == pytest.approx(m[1, 0])
    assert last["AA_MultiReal/eval_phase/test_stream"] == pytest.approx(R.summary()["aa"])
    assert last["BWT_MultiReal/eval_phase/test_stream"] == pytest.approx(m[1, 0] - m[0, 0])
    assert "Top1_MultiReal_Exp/eval_phase/test_stream/Exp001" in text.getvalue()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "Top1_MultiReal_Exp/eval_phase/test_stream/Exp000" in acc.Tags()["scalars"]


def test_periodic_eval_inside_training_fills_rows_and_arrays_work():
    bm = _benchmark(seed=1, per_class=(16, 8))
    metric = AttributionMetric(class_is_fake=CLASS_IS_FAKE, class_task=lambda: CLASS_TASK)
    # epoch-mode periodic eval runs inside train(), before after_training_exp
    strategy = _strategy(metric, [TextLogger(io.StringIO())], eval_every=1)
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[bm.test_stream])
    m = metric.matrix.matrix
    assert metric.matrix.task_names == ("exp0", "exp1")
    assert np.isfinite(m[np.tril_indices(2)]).all() and math.isnan(m[0, 1])
    assert any(r["during_training"] for r in metric.history)
    with pytest.raises(ValueError, match="class_is_fake"):
        AttributionMetric()
    too_small = AttributionMetric(class_is_fake=CLASS_IS_FAKE[:2])
    with pytest.raises(ValueError, match="cover every output"):
        _strategy(too_small, [TextLogger(io.StringIO())]).eval(bm.test_stream)
