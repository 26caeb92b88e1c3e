"""OUT/index.html of `alpaca-jax eval` in a real headless Chromium: two tiny runs (one trained,
with metrics) judged by the scripted fake judge. The table's win rates are results.json's; the
"losses" filter shows exactly the instructions the judge's rule gives to the other run; the
search finds an instruction by a word; the page asks no host for anything; the loss curves plot
every point of metrics.jsonl."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from browser import foreign_requests, requested_urls, screenshot, wait_for
from judge_fakes import ScriptedJudge, by_digest, fake_openai, write_judge_config
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from alpaca_jax.eval import evaluate, load_judge_config
from alpaca_jax.train import read_metrics

# A reference that would break out of the page's JSON or run as HTML if either were not escaped.
HOSTILE = 'The lantern is old.</script><script>document.title = "pwned"</script> & <b>bold</b> \u2028'
TOPICS = "volcano harbor orchestra glacier bicycle lantern meadow compass saffron tundra quartz falcon".split()
CATEGORIES = ("Grammarly", "Gmail", "Wikipedia")


def _rows() -> list[dict]:
    """12 Self-Instruct user-oriented rows, one topic word each (so a search can single one out)."""
    return [{"id": f"user_oriented_task_{i}", "motivation_app": CATEGORIES[i % 3],
             "instruction": f"Describe the {topic} in one sentence.",
             "instances": [{"input": f"near the {i}th mile" if i % 2 else "",
                            "output": HOSTILE if topic == "lantern" else f"The {topic} is old."}]}
            for i, topic in enumerate(TOPICS)]


@pytest.fixture(scope="module")
def report(tmp_path_factory, held_out_run, tiny_run, browser):
    root = tmp_path_factory.mktemp("report")
    rows = _rows()
    data = root / "user_oriented.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = held_out_run[0].run.path  # a run with metrics.jsonl (train and eval loss)
    server = fake_openai.FakeOpenAI(reply=ScriptedJudge(by_digest)).start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OPENAI_API_KEY", "dummy")
            results = evaluate([str(trained), str(tiny_run)], str(data), root / "out",
                               judge=load_judge_config(write_judge_config(root / "judge.yaml", server.url)),
                               baseline=str(tiny_run), max_new_tokens=8, batch_size=12, progress=False)
    finally:
        server.stop()
    assert json.loads((root / "out" / "results.json").read_text()) == results
    requested_urls(browser)  # drain what the browser did before this page
    browser.get((root / "out" / "index.html").as_uri())
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#results tr[data-run]"), what="the results table")
    answers = {name: [r["output"] for r in json.loads((root / "out" / "model_outputs" / f"{name}.json").read_text())]
               for name in ("run", "tiny-run")}
    return SimpleNamespace(out=root / "out", results=results, rows=rows, answers=answers, trained=trained)


def _shown(driver) -> set[int]:
    return set(driver.execute_script(
        "return [...document.querySelectorAll('.item')].filter(e => e.style.display !== 'none')"
        ".map(e => Number(e.dataset.index))"))


def _filter(driver, verdict: str = "all", category: str = "", search: str = "") -> set[int]:
    Select(driver.find_element(By.ID, "verdict")).select_by_value(verdict)
    Select(driver.find_element(By.ID, "category")).select_by_value(category)
    box = driver.find_element(By.ID, "search")
    box.send_keys(Keys.CONTROL, "a")  # typed, not clear(): the page filters on the input event
    box.send_keys(Keys.BACKSPACE, search)
    return _shown(driver)


def test_the_tables_win_rates_are_results_json(report, browser):
    assert report.results["baseline"] == "tiny-run"
    for run in report.results["runs"]:
        row = browser.find_element(By.CSS_SELECTOR, f'#results tr[data-run="{run["name"]}"]')
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        if run["name"] == "tiny-run":
            assert cells[3] == "baseline"
        else:
            judge = run["judge"]
            assert cells[3] == f"{100 * judge['win_rate']:.1f}%"
            assert cells[5] == f"{judge['wins']} / {judge['ties']} / {judge['losses']}"


def test_verdict_filters_show_what_the_judges_rule_gives(report, browser):
    x, y = report.answers["run"], report.answers["tiny-run"]  # what the judge was shown
    # The rule's verdicts in both orders: run's answer shown first, then the baseline's.
    orders = [(by_digest(a, b), by_digest(b, a)) for a, b in zip(x, y)]
    losses = {i for i, (first, second) in enumerate(orders) if (first, second) == ("B", "A")}
    wins = {i for i, (first, second) in enumerate(orders) if (first, second) == ("A", "B")}
    inconsistent = {i for i, (first, second) in enumerate(orders) if first == second != "tie"}
    assert losses and wins and len(losses) < len(TOPICS)  # the check below can fail both ways
    assert _filter(browser, "loss") == losses
    assert _filter(browser, "win") == wins
    assert _filter(browser, "inconsistent") == inconsistent
    assert _filter(browser, "tie") == set(range(len(TOPICS))) - losses - wins
    gmail = {i for i, r in enumerate(report.rows) if r["motivation_app"] == "Gmail"}
    assert _filter(browser, "loss", "Gmail") == losses & gmail
    lost = min(losses)  # the card shows the judge's reasoning, the answers and the reference
    card = browser.find_element(By.CSS_SELECTOR, f'.item[data-index="{lost}"]')
    badges = card.find_elements(By.CSS_SELECTOR, '.answer[data-run="run"] .badge.loss')
    assert [b.text for b in badges] == ["tiny-run wins"] * 2  # both orders
    texts = browser.execute_script("return arguments[0].textContent", card)
    assert "Both answers were read carefully." in texts  # the fake judge's reply
    assert report.rows[lost]["instances"][0]["output"] in texts


def test_texts_are_shown_as_text(report, browser):
    card = browser.find_element(By.CSS_SELECTOR, f'.item[data-index="{TOPICS.index("lantern")}"]')
    shown = browser.execute_script("return arguments[0].querySelector('.answer.reference .text').textContent", card)
    assert shown == HOSTILE and browser.title == "alpaca-jax eval"


def test_search_finds_an_instruction_by_a_word(report, browser):
    assert _filter(browser, search="Orchestra") == {TOPICS.index("orchestra")}
    assert _filter(browser, search="sentence") == set(range(len(TOPICS)))
    assert _filter(browser, search="no-such-word") == set()


def test_no_request_leaves_the_page(report, browser):
    _filter(browser)
    urls = requested_urls(browser)
    assert any(u.startswith("file://") and u.endswith("index.html") for u in urls)  # the log sees the page
    assert foreign_requests(urls, None) == []
    browser.set_window_size(1280, 1500)  # the table, the curves and the first answers
    screenshot(browser, "report")


def test_loss_curves_plot_every_logged_point(report):
    page = (report.out / "index.html").read_text()
    records = read_metrics(report.trained)
    for kind, key in (("train", "loss"), ("eval", "eval_loss")):
        found = re.search(rf'<polyline class="{kind}" data-run="run"[^>]* points="([^"]+)"', page)
        points = [tuple(map(float, p.split(","))) for p in found.group(1).split()]
        logged = [r for r in records if key in r]
        assert len(points) == len(logged) > 0
        xs = [p[0] for p in points]
        assert xs == sorted(xs)  # tokens seen only grows
        # A lower loss is drawn higher (a smaller y).
        assert all(points[i][1] < points[j][1] for i in range(len(points)) for j in range(len(points))
                   if logged[i][key] > logged[j][key] + 1e-9)
    assert 'data-run="tiny-run"' not in page.split("</svg>")[0]  # no metrics, no curve
