// Open a study in OHIF, load one SR (TID 1500) into the active viewport, open the measurement panel.
// Usage: node sr.mjs <origin> <studyUID> <screenshot.png> <SR series description>
// Prints every console message of OHIF's SR extension and every error, whether OHIF asked to
// track the report's measurements (it does when it can hydrate them: then "Yes"), then
// "VIEWPORT <text>" (the page's text: the SR viewport writes each measurement's labels there)
// and "PANEL <text>" (the measurement panel).
import { log, skipTour, withStudy } from './ohif.mjs';

const [origin, study, shot, description] = process.argv.slice(2);
const text = async locator => (await locator.innerText()).replace(/\s+/g, ' ');
const onConsole = m => {
  if (['error', 'warning'].includes(m.type()) || /rehydratable|Error Boundary/.test(m.text())) {
    log(`console ${m.type()}:`, m.text().slice(0, 400).replace(/\s+/g, ' '));
  }
};
await withStudy(origin, study, shot, onConsole, async page => {
  await skipTour(page);
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
});
