"""Progress: modules and layers done, and the ETA from the work left (module sizes × measured cost)."""
from lrcompress.pipeline.distributed import Collective, CompressJob
from lrcompress.pipeline.observer import PlannedWork, WorkProgress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_is_seconds_per_parameter_of_finished_modules_times_parameters_left():
    clock = Clock()
    progress = WorkProgress(total=4, clock=clock)
    # two targeted layers out of four (the untargeted ones cost nothing), 100 + 300 parameters each
    progress.plan([PlannedWork(0, 0, 100), PlannedWork(0, 0, 300), PlannedWork(2, 0, 100), PlannedWork(2, 0, 300)])
    assert progress.eta_seconds is None and progress.describe() == "0/4 layers, 0/4 modules, ETA ?"
    clock.now = 4.0
    progress.module_done(0, 0, 100, 4.0)          # 0.04 s per parameter, no overhead so far
    assert progress.eta_seconds == 0.04 * 700
    clock.now = 20.0
    progress.module_done(0, 0, 300, 12.0)         # 16 s of modules for 400 parameters; 4 s of other work
    progress.finish(0)
    progress.finish(1)
    assert progress.eta_seconds == 400 * 16.0 / 400 + 400 * 4.0 / 400
    assert progress.describe() == "2/4 layers, 2/4 modules, ETA 20s"
    fields = progress.fields()
    assert (fields["modules_done"], fields["modules_total"], fields["eta_seconds"]) == (2, 4, 20.0)
    assert fields["peak_rss_bytes"] > 0


def test_each_stage_costs_what_it_was_measured_to_cost():
    clock = Clock()
    progress = WorkProgress(total=2, clock=clock)
    progress.plan([PlannedWork(layer, stage, 100) for layer in (0, 1) for stage in (0, 1)])
    progress.module_done(0, 0, 100, 1.0)          # stage 0 cheap
    progress.module_done(0, 1, 100, 99.0)         # stage 1 expensive
    clock.now = 100.0
    assert progress.eta_seconds == 1.0 + 99.0


def test_a_layer_that_ends_unreported_leaves_the_work_left():
    """A resumed run replays finished layers without module events: they are no longer work left."""
    progress = WorkProgress(total=2, clock=Clock())
    progress.plan([PlannedWork(0, 0, 100), PlannedWork(1, 0, 100)])
    progress.finish(0)
    assert progress.modules_done == 1 and progress.eta_seconds is None
    progress.module_done(1, 0, 100, 2.0)
    progress.finish(1)
    assert progress.eta_seconds == 0.0 and progress.modules_done == 2


def test_a_later_stage_reporting_a_compressed_size_still_takes_its_planned_work():
    progress = WorkProgress(total=1, clock=Clock())
    progress.plan([PlannedWork(0, 1, 1000)])
    progress.module_done(0, 1, 250, 5.0)          # e.g. EoRA after GPTQ: the module it sees is quantized
    assert progress.work[(0, 1)] == [] and progress.stage_params[1] == 1000


def test_jobs_report_as_each_finishes():
    events = []

    def job(name):
        def run():
            events.append(f"run {name}")
            return [name]
        return CompressJob(1, run)

    outcomes = Collective().run_jobs([job("a"), job("b")], on_done=lambda i, o: events.append(f"done {i}"))
    assert events == ["run a", "done 0", "run b", "done 1"] and [o.results for o in outcomes] == [["a"], ["b"]]


def test_durations_read_at_a_glance():
    assert [format_duration(s) for s in (4.4, 187, 7500)] == ["4s", "3m07s", "2h05m"]
