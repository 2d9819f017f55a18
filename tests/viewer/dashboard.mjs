// Drive musclenode's dashboard in headless Chromium for tests/test_dashboard.py.
// Usage: node dashboard.mjs '<json settings>'; talks with the test on stdin/stdout:
//   prints "WAITING <what>" and reads one line before going on; prints "RESULT <json>" at the end.
import { chromium } from 'playwright-core';
import readline from 'node:readline';

const settings = JSON.parse(process.argv[2]);
const { origin, artifacts, job, destination, operator, viewer, arrivalName } = settings;
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const log = (...a) => console.log(new Date().toISOString(), ...a);
const result = { urls: [], steps: [] };

async function waitFor(what) {
  console.log(`WAITING ${what}`);
  const line = await lines.next();
  if (line.done) throw new Error(`no answer from the test for ${what}`);
}

function watch(page) {
  page.on('request', r => result.urls.push(r.url()));
  page.on('console', m => { if (m.type() === 'error') log('console error:', m.text().slice(0, 300)); });
  page.on('pageerror', e => log('page error:', String(e).slice(0, 300)));
  let navigations = 0;
  page.on('framenavigated', f => { if (f === page.mainFrame()) navigations++; });
  return () => navigations;
}

async function login(page, user) {
  await page.fill('input[name="user"]', user.name);
  await page.fill('input[name="password"]', user.password);
  await Promise.all([page.waitForURL(u => !u.pathname.startsWith('/login')), page.click('button[type="submit"]')]);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
});
try {
  // --- the operator -------------------------------------------------------------------------
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const navigations = watch(page);

  // Without a session, any page gives the login page.
  await page.goto(`${origin}/jobs`);
  result.loginPage = { path: new URL(page.url()).pathname, password: await page.locator('input[type="password"]').count() };
  await login(page, operator);
  result.afterLogin = new URL(page.url()).pathname;

  // Studies: a new arrival shows up without reloading.
  await page.goto(`${origin}/studies`);
  result.studiesText = await page.locator('main').innerText();
  const before = navigations();
  await waitFor('studies-open');
  await page.locator('#live').getByText(arrivalName).first().waitFor({ timeout: 60000 });
  result.arrivalLive = { navigations: navigations() - before };
  log('arrival shown live');
  await page.screenshot({ path: `${artifacts}/dashboard-studies.png`, fullPage: true });

  // The processed study: its series' decisions.
  await page.locator('#live table').nth(1).locator('a').filter({ hasText: settings.patientName }).first().click();
  await page.waitForURL(/\/studies\/[^/]+$/);
  result.studyPath = new URL(page.url()).pathname;
  result.studyText = await page.locator('main').innerText();

  // The job: summary pages as images, the measurement table, downloads.
  await page.goto(`${origin}/jobs/${job}`);
  const images = page.locator('img.summary');
  await images.first().waitFor({ timeout: 30000 });
  await page.waitForFunction(() => [...document.querySelectorAll('img.summary')].every(i => i.complete && i.naturalWidth > 0),
                             null, { timeout: 30000 });
  result.summaries = await images.evaluateAll(list => list.map(i => ({ width: i.naturalWidth, height: i.naturalHeight })));
  result.measurements = await page.locator('table.measurements').evaluate(table => {
    const heads = [...table.querySelectorAll('thead th')].map(th => th.innerText.trim());
    return [...table.querySelectorAll('tbody tr')].map(tr => Object.fromEntries(
      [...tr.querySelectorAll('td')].map((td, i) => [heads[i], td.innerText.trim()])));
  });
  result.downloads = await page.locator('ul.downloads a').evaluateAll(list => list.map(a => a.innerText.trim()));
  const seg = await context.request.get(`${origin}${await page.locator('ul.downloads a').first().getAttribute('href')}`);
  result.segDownload = { status: seg.status(), type: seg.headers()['content-type'], magic: (await seg.body()).subarray(128, 132).toString() };
  await page.screenshot({ path: `${artifacts}/dashboard-job.png`, fullPage: true });

  // Deliveries: the destination is down, so they are retrying with an error.
  await page.goto(`${origin}/deliveries`);
  const section = page.locator(`section.destination[data-destination="${destination}"]`);
  const row = section.locator(`tr.delivery[data-job="${job}"]`);
  await row.waitFor({ timeout: 30000 });
  result.downRow = await row.innerText();
  await page.screenshot({ path: `${artifacts}/dashboard-deliveries-down.png`, fullPage: true });
  await waitFor('destination-down-seen');

  // The destination is up again: retry from the page; it shows delivered without a reload.
  await Promise.all([page.waitForURL(`${origin}/deliveries`), row.locator('button.retry').click()]);
  const afterRetry = navigations();
  result.retryMessage = await page.locator('.message').first().innerText();
  await section.locator(`tr.delivered[data-job="${job}"]`).waitFor({ timeout: 120000 });
  result.delivered = { navigations: navigations() - afterRetry, row: await section.locator(`tr.delivered[data-job="${job}"]`).innerText(),
                       pendingLeft: await section.locator(`tr.delivery[data-job="${job}"]`).count() };
  await page.screenshot({ path: `${artifacts}/dashboard-deliveries.png`, fullPage: true });

  // Without a valid token, an operator's action is refused too.
  result.operatorForged = (await context.request.post(`${origin}/deliveries/send-now`, { form: { destination } })).status();

  // A narrow screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${origin}/jobs/${job}`);
  await page.waitForFunction(() => [...document.querySelectorAll('img.summary')].every(i => i.complete && i.naturalWidth > 0));
  result.narrow = await page.evaluate(() => ({ page: document.documentElement.scrollWidth, screen: window.innerWidth,
                                               image: document.querySelector('img.summary').getBoundingClientRect().width }));
  await page.screenshot({ path: `${artifacts}/dashboard-job-narrow.png`, fullPage: true });
  await context.close();

  // --- the viewer ---------------------------------------------------------------------------
  const viewerContext = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const viewerPage = await viewerContext.newPage();
  watch(viewerPage);
  await viewerPage.goto(`${origin}/deliveries`);
  await login(viewerPage, viewer);
  result.viewerLanding = new URL(viewerPage.url()).pathname;
  result.viewerDeliveriesText = await viewerPage.locator('main').innerText();
  result.viewerButtons = await viewerPage.locator('main button').count();
  await viewerPage.goto(`${origin}/jobs/${job}`);
  result.viewerJobButtons = await viewerPage.locator('main button').count();
  result.viewerForged = (await viewerContext.request.post(`${origin}/deliveries/send-now`, { form: { destination } })).status();
  result.viewerForgedJob = (await viewerContext.request.post(`${origin}/jobs/${job}/retry`, { form: { csrf: 'made-up' } })).status();
  await viewerContext.close();

  // --- no session at all ----------------------------------------------------------------------
  const stranger = await browser.newContext();
  const strangerPage = await stranger.newPage();
  await strangerPage.goto(`${origin}${result.studyPath}`);
  result.strangerPath = new URL(strangerPage.url()).pathname;
  result.strangerText = await strangerPage.locator('main').innerText();
  result.strangerImage = (await stranger.request.get(`${origin}/jobs/${job}/summary/1.png`, { maxRedirects: 0 })).status();
  await stranger.close();
  console.log('RESULT ' + JSON.stringify(result));
} catch (e) {
  log('FAILED', String(e).slice(0, 2000));
  for (const context of browser.contexts()) {
    for (const [i, p] of context.pages().entries()) await p.screenshot({ path: `${artifacts}/dashboard-failed-${i}.png`, fullPage: true }).catch(() => {});
  }
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit();  // the reader of standard input would keep node running
}
