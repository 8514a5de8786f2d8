"""progress="lines": plain stderr lines for logs (start, periodic count with ETA, end), no redraws."""

import convfactor.progress as progress


def test_lines_mode_prints_start_periodic_eta_and_end(capsys, monkeypatch):
    clock = iter(range(0, 1000, 20))  # every reading of the clock advances 20 s
    monkeypatch.setattr(progress, "LINE_INTERVAL", 30.0)
    bar = progress._Lines("candidates", 4, "layer", interval=30.0)
    bar._time = lambda: float(next(clock))
    bar.started = bar._last = bar._time()
    for _ in range(4):
        bar.update()
    bar.close()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == "candidates: started (4 layers)"
    assert any("ETA" in line and "/4 layers" in line for line in lines[1:-1])
    assert lines[-1].startswith("candidates: 4/4 layers [") and lines[-1].endswith(", done]")
    assert "\r" not in err


def test_track_in_lines_mode_yields_every_item(capsys):
    assert list(progress.track([1, 2, 3], "lines", "refit")) == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.startswith("refit: started (3 layers)") and "3/3 layers" in err


def test_disabled_progress_prints_nothing(capsys):
    assert list(progress.track(range(3), False, "refit")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_lines_mode_takes_what_tqdm_callers_use(capsys):
    """finetune sets a postfix and benchmarking re-estimates the total: both work on a plain-lines bar."""
    bar = progress.open_bar("lines", "finetune", total=2, unit="step")
    bar.update()
    bar.set_postfix(loss="0.125")
    bar.total = 3
    bar.refresh()
    bar.update(2)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("finetune: 3/3 steps [") and lines[-1].endswith(", loss=0.125, done]")


def test_a_disabled_bar_takes_the_same_calls_and_prints_nothing(capsys):
    bar = progress.open_bar(False, "benchmark", total=5, unit="pair")
    bar.update()
    bar.set_postfix(loss="1")
    bar.total = 9
    bar.refresh()
    bar.close()
    assert capsys.readouterr().err == ""
