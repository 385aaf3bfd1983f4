"""Layer progress: done/total and the ETA from the mean time of a finished layer."""
from lrcompress.pipeline.observer import LayerProgress, format_duration


def test_eta_is_mean_layer_time_times_layers_left():
    progress = LayerProgress(total=5)
    assert progress.eta_seconds is None and progress.describe() == "0/5 layers, ETA ?"
    progress.finish(2.0)
    progress.finish(4.0)
    assert progress.eta_seconds == 3.0 * 3
    assert progress.describe() == "2/5 layers, ETA 9s"
    fields = progress.fields()
    assert (fields["layers_done"], fields["layers_total"], fields["eta_seconds"]) == (2, 5, 9.0)
    assert fields["peak_rss_bytes"] > 0


def test_durations_read_at_a_glance():
    assert [format_duration(s) for s in (4.4, 187, 7500)] == ["4s", "3m07s", "2h05m"]
