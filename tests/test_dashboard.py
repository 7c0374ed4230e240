"""The static dashboard in a real headless Chromium, opened from file://."""
import os
import shutil

import pytest

from dictlearn.analysis import dashboard
from dictlearn.analysis import features

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--no-first-run']


def open_browser(playwright):
  """Debian's chromium driven by Playwright (never a downloaded browser)."""
  if not os.path.exists(CHROMIUM):
    pytest.fail(f'{CHROMIUM} missing: apt-get install -y chromium (.ci/run does it)')
  return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def keep_artifact(path):
  """Copies a test artifact to $DICTLEARN_ARTIFACTS when it is set."""
  target = os.environ.get('DICTLEARN_ARTIFACTS')
  if target:
    os.makedirs(target, exist_ok=True)
    shutil.copy(path, target)


def test_token_bucket_is_fnv1a():
  assert dashboard.token_bucket('', 1 << 32) == 0x811C9DC5
  assert dashboard.token_bucket('a', 1 << 32) == 0xE40C292C  # FNV-1a 32 of 'a'
  assert dashboard.normalise('  The\n') == 'the'


def test_dashboard_in_headless_chromium(tiny_feature_run, tmp_path):
  from playwright import sync_api  # pylint: disable=g-import-not-at-top (the test extra)
  stats_dir = features.compute_statistics(
      tiny_feature_run, out=str(tmp_path / 'features'),
      options=features.Options(batch_size=512, contexts_top=4, contexts_per_quantile=2,
                               progress=False))
  site = str(tmp_path / 'site')
  index = dashboard.build_dashboard(stats_dir, site, progress=False)
  stats = features.load_statistics(stats_dir)
  # A token some feature fires on hardest, as the index lists it (no vocabulary: '<id>').
  feature = int(stats.frequency.argmax())
  top_token = stats.feature(feature)['contexts'][0]['text'][stats.window_before]
  files = os.listdir(os.path.join(site, 'data'))
  assert len(files) < 2 + 1 + 3 + dashboard.TOKEN_BUCKETS + 1 + 1  # sharded, not one per feature
  with sync_api.sync_playwright() as playwright:
    browser = open_browser(playwright)
    page = browser.new_page(viewport={'width': 1200, 'height': 900})
    errors = []
    page.on('console', lambda m: errors.append(m.text) if m.type == 'error' else None)
    page.on('pageerror', lambda e: errors.append(str(e)))
    page.on('requestfailed', lambda r: errors.append(f'failed: {r.url}'))
    page.goto(f'file://{index}')
    page.wait_for_selector('table.index tbody tr')
    assert page.locator('table.index tbody tr').count() == dashboard.PAGE_SIZE
    assert page.locator('.density img').evaluate('img => img.complete && img.naturalWidth') > 0
    first = page.locator('table.index tbody tr').first.get_attribute('data-feature')
    assert int(first) == feature  # sorted by frequency, densest first
    page.locator('th', has_text='max act.').click()
    page.wait_for_function("document.body.dataset.ready.includes('sort=max')")
    assert int(page.locator('table.index tbody tr').first.get_attribute('data-feature')) == int(
        stats.max_activation.argmax())
    page.fill('#search', top_token)
    page.press('#search', 'Enter')
    page.wait_for_selector('h2:has-text("features fire on")')
    found = [int(r.get_attribute('data-feature'))
             for r in page.locator('table.index tbody tr').all()]
    assert feature in found
    page.locator(f'tr[data-feature="{feature}"]').click()
    page.wait_for_selector('.context .tok')
    contexts = page.locator('.context')
    assert contexts.count() == len(stats.feature(feature)['contexts'])
    centre = page.locator('.context').first.locator('.tok.centre')
    value = float(centre.get_attribute('data-act'))
    assert value == pytest.approx(stats.feature(feature)['contexts'][0]['value'], rel=1e-3)
    assert 'rgba(239, 108, 0, 1.000)' in centre.get_attribute('style')  # the hardest: full shade
    assert centre.get_attribute('title').endswith(f'{value:.3f}')
    assert page.locator('svg.hist rect').count() == len(stats.hist_edges) - 1
    heights = page.locator('svg.hist rect').evaluate_all('rs => rs.map(r => +r.getAttribute("height"))')
    assert sum(h > 0 for h in heights) >= 1
    page.goto(f'file://{index}#f={stats.n_latents + 5}')
    page.wait_for_selector('text=No feature')
    shot = str(tmp_path / 'dashboard.png')
    page.goto(f'file://{index}#f={feature}')
    page.wait_for_selector('.context .tok')
    page.screenshot(path=shot)
    browser.close()
  keep_artifact(shot)
  assert errors == []
