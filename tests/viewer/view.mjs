// Open a study in OHIF, load its SEG over the MR series, screenshot the viewport.
// Usage: node view.mjs <origin> <studyUID> <screenshot.png> <label> [<label>...]
// SEG_INDEX (environment, default 0): which SEG thumbnail to load, for studies with several SEGs.
import { log, skipTour, withStudy } from './ohif.mjs';

const [origin, study, shot, ...labels] = process.argv.slice(2);
const onConsole = m => { if (m.type() === 'error') log('console error:', m.text().slice(0, 300)); };
await withStudy(origin, study, shot, onConsole, async page => {
  await page.screenshot({ path: shot.replace(/\.png$/, '-mr.png') });
  await skipTour(page);
  // The SEG's thumbnail in the study browser: double-click loads it into the active viewport.
  const segIndex = Number(process.env.SEG_INDEX || 0);
  const segs = page.locator('[data-cy="study-browser-thumbnail"], [data-cy^="study-browser-thumbnail"]').filter({ hasText: 'SEG' });
  const seg = segs.nth(segIndex);
  await seg.waitFor({ timeout: 30000 });
  log(`SEG thumbnails: ${await segs.count()}`);
  await seg.dblclick();
  log(`SEG thumbnail ${segIndex} double-clicked`);
  // OHIF asks whether to load (hydrate) the segmentation; say yes.
  for (let i = 0; i < 20; i++) {
    const yes = page.getByRole('button', { name: /^(Yes|Load)$/i });
    if (await yes.count()) { await yes.first().click(); log('confirmed load'); break; }
    await page.waitForTimeout(500);
  }
  // Open the segmentation panel (right side panel) so that the segments are listed.
  await page.waitForTimeout(3000);
  await page.locator('[data-cy="panelSegmentation-btn"]').first().click();
  for (const label of labels) {
    await page.getByText(new RegExp(label.replace(/_/g, '[ _]'), 'i')).first().waitFor({ timeout: 20000 });
    log('segment listed:', label);
  }
  await page.waitForTimeout(3000);
  await page.screenshot({ path: shot });
  const box = await page.locator('.cornerstone-viewport-element, [data-viewport-uid]').first().boundingBox();
  console.log('VIEWPORT ' + JSON.stringify(box));
});
