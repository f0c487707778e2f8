// Drives the OHIF viewer in headless Chromium (playwright-core) through one study and records
// what the page shows; tests/viewer/test_ohif.py starts the servers, runs this and judges.
//
//   node tests/viewer/drive.mjs SPEC.json RESULT.json
//
// SPEC: {base, study, patientId, userDataDir, out, chromium,
//        series: {dx, sc, gsps, sr}}   (series: SeriesDescription of each object)
// RESULT: one object per step (studyList, dx, gsps, sc, sr, tracking) with what the
// DOM held (texts, SVG polylines, overlay lines, tooltips), the screenshots written under
// `out`, and the error of a step that failed; plus every console message and page error, and
// every request to a host other than 127.0.0.1 (all are aborted: nothing comes from outside).
// A step that fails is recorded and the next one still runs; the exit status is 0 when the
// result file was written.

import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [specPath, resultPath] = process.argv.slice(2);
const spec = JSON.parse(fs.readFileSync(specPath, 'utf8'));
const result = { steps: {}, console: [], pageErrors: [], blocked: [], screenshots: [] };
let step = 'launch';

const VIEWPORT = '.viewport-element';
const OVERLAY_DESCRIPTION = '[data-cy="viewport-overlay-top-left"] [title="Series description"]';
const ROW_LABEL = '[data-cy="series-description-label"]';

const context = await chromium.launchPersistentContext(spec.userDataDir, {
  executablePath: spec.chromium,
  headless: true,
  viewport: { width: 1600, height: 1000 },
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
// A radiologist's browser has seen OHIF's first-visit tour; it would cover the viewport.
await context.addInitScript(() => {
  localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
});
const page = context.pages()[0] ?? (await context.newPage());
page.on('console', message => {
  result.console.push({ step, type: message.type(), text: message.text().slice(0, 2000) });
});
page.on('pageerror', error => {
  result.pageErrors.push({ step, text: String(error.stack || error).slice(0, 2000) });
});
await context.route('**/*', route => {
  const url = new URL(route.request().url());
  if (url.protocol === 'data:' || url.protocol === 'blob:' || url.hostname === '127.0.0.1') {
    return route.continue();
  }
  result.blocked.push(url.href);
  return route.abort();
});

async function shot(name, locator = null) {
  const file = path.join(spec.out, `${name}.png`);
  await (locator ?? page).screenshot({ path: file });
  result.screenshots.push(file);
  return file;
}

async function run(name, body) {
  step = name;
  const started = Date.now();
  const record = { };
  result.steps[name] = record;
  try {
    await body(record);
  } catch (error) {
    record.error = String(error.message || error).split('\n').slice(0, 6).join('\n');
    try {
      record.errorScreenshot = await shot(`${name}-error`);
    } catch {
      // the page itself is gone; the error says why
    }
  }
  record.seconds = (Date.now() - started) / 1000;
}

/** The series row (study browser) whose description is `description`. */
function seriesLabel(description) {
  return page.locator(ROW_LABEL).filter({ hasText: new RegExp(`^${escape(description)}$`) });
}

function escape(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

async function openViewer() {
  await page.goto(`${spec.base}/viewer?StudyInstanceUIDs=${spec.study}`);
  await seriesLabel(spec.series.dx).first().waitFor({ timeout: 60000 });
  await waitForOverlay(spec.series.dx);
  const tour = page.getByText('Skip all'); // should a tour come despite shownTours, skip it
  if (await tour.isVisible()) await tour.click();
}

/** Wait until the viewport draws an SR annotation, or OHIF reports an error (its error
 * boundary logs 'Error Boundary'), or `timeout` ms pass; which of 'drawn', 'error', 'timeout'. */
async function waitForAnnotation(since, timeout) {
  const deadline = Date.now() + timeout;
  while (Date.now() < deadline) {
    if (await page.locator(`${VIEWPORT} svg polyline`).count()) return 'drawn';
    if (result.console.slice(since).some(m => m.text.includes('Error Boundary'))) return 'error';
    await page.waitForTimeout(250);
  }
  return 'timeout';
}

async function waitForOverlay(description, timeout = 30000) {
  await page.locator(OVERLAY_DESCRIPTION).filter({ hasText: description }).first()
    .waitFor({ timeout });
  await page.waitForTimeout(1500); // let the frame be rendered after the metadata is in
}

async function openSeries(description) {
  await page.mouse.move(1000, 990);
  // dblclick by event: a hover tooltip over the row would swallow a pointer double click
  await seriesLabel(description).first().dispatchEvent('dblclick');
}

async function viewportState() {
  const viewport = page.locator(VIEWPORT).first();
  const box = (await viewport.count()) ? await viewport.boundingBox() : null;
  return page.evaluate(([selector, overlay, box]) => {
    const element = document.querySelector(selector);
    const canvas = element?.querySelector('canvas');
    return {
      box,
      devicePixelRatio: window.devicePixelRatio,
      canvas: canvas ? { width: canvas.width, height: canvas.height } : null,
      overlayDescription: [...document.querySelectorAll(overlay)].map(e => e.textContent),
      polylines: [...(element?.querySelectorAll('svg polyline') ?? [])].map(p => ({
        points: p.getAttribute('points'),
        stroke: p.getAttribute('stroke'),
        dash: p.getAttribute('stroke-dasharray'),
      })),
      svgText: [...(element?.querySelectorAll('svg text') ?? [])].map(t =>
        [...t.querySelectorAll('tspan')].map(s => s.textContent)),
    };
  }, [VIEWPORT, OVERLAY_DESCRIPTION, box]);
}

try {
  await run('studyList', async record => {
    await page.goto(`${spec.base}/`);
    const cell = page.getByText(spec.patientId, { exact: true }).first();
    await cell.waitFor({ timeout: 60000 });
    const row = cell.locator('xpath=ancestor::tr[1]');
    record.row = (await row.count()) ? await row.innerText() : null;
    record.screenshot = await shot('01-study-list');
  });

  await run('dx', async record => {
    await openViewer();
    record.series = await page.locator(ROW_LABEL).evaluateAll(labels => labels.map(label => {
      const row = label.closest('[data-cy^="study-browser-thumbnail"]') ?? label.parentElement;
      const modality = row?.querySelector('[data-cy="series-modality-label"]')?.textContent
        ?? row?.innerText.split('\n')[0];
      return { description: label.textContent, modality, text: row?.innerText ?? '' };
    }));
    record.bodyText = await page.innerText('body');
    record.state = await viewportState();
    record.screenshot = await shot('02-dx');
    record.viewportScreenshot = await shot('02-dx-viewport', page.locator(VIEWPORT).first());
  });

  await run('gsps', async record => {
    const row = page.locator('[data-cy="study-browser-thumbnail-no-image"]')
      .filter({ has: seriesLabel(spec.series.gsps) });
    record.rows = await row.count();
    const warning = row.first().locator('button[id^="display-set-tooltip-"]');
    record.warningIcon = (await warning.count()) > 0;
    if (record.warningIcon) {
      await warning.first().hover();
      await page.locator('[data-radix-popper-content-wrapper]').first()
        .waitFor({ timeout: 10000 });
      record.tooltip = await page.locator('[data-radix-popper-content-wrapper]').allInnerTexts();
      record.tooltipScreenshot = await shot('03-gsps-tooltip');
    }
    const consoleBefore = result.console.length;
    await openSeries(spec.series.gsps);
    await page.waitForTimeout(3000);
    record.consoleAfterOpen = result.console.slice(consoleBefore).map(m => m.text.split('\n')[0]);
    record.bodyText = await page.innerText('body'); // with OHIF's notification, if any
    record.state = await viewportState();
    record.screenshot = await shot('03-gsps-open');
  });

  await run('sc', async record => {
    await openSeries(spec.series.sc);
    await waitForOverlay(spec.series.sc);
    record.state = await viewportState();
    record.screenshot = await shot('04-sc');
    record.viewportScreenshot = await shot('04-sc-viewport', page.locator(VIEWPORT).first());
  });

  await run('sr', async record => {
    await openViewer(); // a fresh page: the SC opened OHIF's cine player
    const consoleBefore = result.console.length;
    await openSeries(spec.series.sr);
    // either the SR's boxes are drawn over their image, or the viewer gives up: wait for either
    record.outcome = await waitForAnnotation(consoleBefore, 30000);
    await page.waitForTimeout(1500);
    record.state = await viewportState();
    record.bodyText = await page.innerText('body');
    record.consoleAfterOpen = result.console.slice(consoleBefore).map(m => m.text);
    record.screenshot = await shot('05-sr');
    record.viewportScreenshot = await shot('05-sr-viewport', page.locator(VIEWPORT).first());
  });

  await run('tracking', async record => {
    // OHIF offers to track (hydrate) the SR's measurements: accept and see what it makes of them
    const prompt = page.getByText('Do you want to continue tracking measurements', { exact: false });
    record.prompted = await prompt.first().isVisible();
    if (!record.prompted) return;
    const consoleBefore = result.console.length;
    await page.getByRole('button', { name: 'Yes', exact: true }).first().click();
    await page.waitForTimeout(4000);
    record.consoleAfterYes = result.console.slice(consoleBefore).map(m => m.text.split('\n')[0]);
    record.state = await viewportState();
    record.screenshot = await shot('06-sr-tracking');
  });
} finally {
  step = 'close';
  fs.writeFileSync(resultPath, JSON.stringify(result, null, 1));
  await context.close();
}
