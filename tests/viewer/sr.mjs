// Open a study in OHIF, load one SR (TID 1500) into the active viewport, open the measurement panel.
// Usage: node sr.mjs <origin> <studyUID> <screenshot.png> <SR series description>
// Prints every console message of OHIF's SR extension and every error, whether OHIF asked to
// track the report's measurements (it does when it can hydrate them: then "Yes"), then
// "VIEWPORT <text>" (the page's text: the SR viewport writes each measurement's labels there)
// and "PANEL <text>" (the measurement panel).
import { chromium } from 'playwright-core';

const [origin, study, shot, description] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run', '--use-gl=swiftshader',
         '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'],
});
const log = (...a) => console.log(new Date().toISOString(), ...a);
const text = async locator => (await locator.innerText()).replace(/\s+/g, ' ');
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on('console', m => {
    if (['error', 'warning'].includes(m.type()) || /rehydratable|Error Boundary/.test(m.text())) {
      log(`console ${m.type()}:`, m.text().slice(0, 400).replace(/\s+/g, ' '));
    }
  });
  page.on('pageerror', e => log('page error:', String(e).slice(0, 400)));
  await page.goto(`${origin}/viewer?StudyInstanceUIDs=${study}`, { waitUntil: 'domcontentloaded' });
  await page.waitForSelector('.cornerstone-canvas, canvas', { timeout: 60000 });
  log('canvas present');
  await page.waitForTimeout(3000);
  // The onboarding tour (Shepherd) covers the page on a first visit: skip it.
  await page.keyboard.press('Escape');
  await page.evaluate(() => document.querySelectorAll('.shepherd-modal-overlay-container, .shepherd-element').forEach(e => e.remove()));
  const thumbnails = page.locator('[data-cy^="study-browser-thumbnail"]');
  const sr = thumbnails.filter({ hasText: description });
  await sr.first().waitFor({ timeout: 30000 });
  log(`thumbnails: ${JSON.stringify((await thumbnails.allInnerTexts()).map(t => t.replace(/\s+/g, ' ')))}`);
  await sr.first().dblclick();
  log('SR thumbnail double-clicked');
  // Where OHIF can hydrate the report's measurements it asks whether to track them.
  for (let i = 0; i < 30; i++) {
    const yes = page.locator('[data-cy="prompt-begin-tracking-yes-btn"]').or(page.getByRole('button', { name: /^Yes$/ }));
    if (await yes.count()) { await yes.first().click(); log('tracking prompt: yes'); break; }
    await page.waitForTimeout(500);
  }
  await page.waitForTimeout(3000);
  log('VIEWPORT ' + await text(page.locator('body')));
  const panel = page.locator('[data-cy="trackedMeasurements-btn"], [data-cy="panelMeasurement-btn"]');
  if (await panel.count()) {
    await panel.first().click();
    await page.waitForTimeout(2000);
    const found = page.locator('[data-cy="trackedMeasurements-panel"], [data-cy="measurements-panel"]');
    log('PANEL ' + (await found.count() ? await text(found.first()) : '(no panel)'));
  } else {
    log('PANEL (no measurement panel button)');
  }
  await page.screenshot({ path: shot });
} catch (e) {
  log('FAILED', String(e).slice(0, 1000));
  await (await browser.contexts()[0]?.pages()[0])?.screenshot({ path: shot.replace(/\.png$/, '-failed.png') }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
