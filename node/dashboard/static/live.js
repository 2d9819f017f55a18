// Live updates: when the server says the node's data changed (server-sent events on /events),
// fetch this page's live part again and put it in place. No reload, no library.
(() => {
  const live = document.getElementById('live');
  if (!live || !window.EventSource) return;
  let busy = false, again = false, shown = live.innerHTML;
  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      do {
        again = false;
        const response = await fetch(live.dataset.fragment, { credentials: 'same-origin' });
        if (response.status === 401) { location.reload(); return; }
        if (response.ok) {
          const html = await response.text();
          if (html !== shown) { live.innerHTML = html; shown = html; }
        }
      } while (again);
    } catch (error) {
      // The node may be restarting; the next event tries again.
    } finally {
      busy = false;
    }
  }
  const events = new EventSource('/events');
  events.addEventListener('change', refresh);
  events.addEventListener('expired', () => { events.close(); location.reload(); });
})();
