// Shared by view.mjs and sr.mjs: OHIF's viewer for one study in headless Chromium.
import { chromium } from 'playwright-core';

export const log = (...a) => console.log(new Date().toISOString(), ...a);

// Launch Chromium (CHROMIUM, default /usr/bin/chromium; software WebGL), open OHIF's viewer for
// the study and wait until its first canvas is drawn, then run steps(page). Page errors are
// logged, console messages go to onConsole; a failure is logged with a screenshot
// (<shot>-failed.png) and sets the exit code to 1.
export async function withStudy(origin, study, shot, onConsole, steps) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--no-first-run', '--use-gl=swiftshader',
           '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on('console', onConsole);
    page.on('pageerror', e => log('page error:', String(e).slice(0, 400)));
    await page.goto(`${origin}/viewer?StudyInstanceUIDs=${study}`, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('.cornerstone-canvas, canvas', { timeout: 60000 });
    log('canvas present');
    await page.waitForTimeout(3000);
    await steps(page);
  } catch (e) {
    log('FAILED', String(e).slice(0, 1000));
    await (await browser.contexts()[0]?.pages()[0])?.screenshot({ path: shot.replace(/\.png$/, '-failed.png') }).catch(() => {});
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

// The onboarding tour (Shepherd) covers the page on a first visit: skip it.
export async function skipTour(page) {
  await page.keyboard.press('Escape');
  await page.evaluate(() => document.querySelectorAll('.shepherd-modal-overlay-container, .shepherd-element').forEach(e => e.remove()));
}
