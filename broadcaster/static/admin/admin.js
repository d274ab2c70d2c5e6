/*
 * The broadcaster operator dashboard (broadcaster/http/admin.py serves it;
 * docs/admin.rst is its guide).
 *
 * The key.  The page holds no data of its own: it asks for one of the
 * server's API keys, keeps it in sessionStorage (this tab only, never in
 * an address) and sends it as "Authorization: Bearer <key>" with every
 * request.  A 401 signs the page out and forgets the key.
 *
 * The figures.  GET /admin/stream is read with fetch() (EventSource cannot
 * send the key) as Server-Sent Events: "backlog" first (the server's last
 * 15 minutes of samples), then every second a "sample" (this node's rates)
 * and "rooms" (the busiest rooms, all nodes).  The page keeps the last 15
 * minutes of samples and draws them on <canvas>, with no library; each
 * canvas's data-latest holds the values its legend shows.  A dropped
 * stream is reopened after two seconds.
 *
 * Everything else goes through the server API: /admin/nodes every five
 * seconds (every node, and the backplane as this node sees it),
 * /api/rooms/<room>/presence and /history for a room's members (a page at
 * a time) and recent messages, POST /api/disconnect and POST /api/publish
 * for the actions.
 *
 * What the server sends (room names, user names, messages) is shown with
 * textContent only, never innerHTML.
 */
(() => {
  'use strict';

  const KEY_STORE = 'broadcaster.admin.key';
  const WINDOW = 15 * 60; // seconds of samples kept and drawn at most
  const MIN_SPAN = 60; // seconds the charts span at least
  const RETRY_MS = 2000;
  const NODES_EVERY_MS = 5000;
  const HISTORY_SHOWN = 20;
  const KINDS = ['plain', 'json', 'line', 'image', 'sse'];

  const $ = (id) => document.getElementById(id);

  let key = null;
  let samples = [];
  let node = null;
  let nodesInfo = null;
  let stream = null; // the AbortController of the open stream
  let retryTimer = null;
  let nodesTimer = null;
  let drawQueued = false;
  let roomShown = null;
  let roomNext = null;

  class Refused extends Error {}

  // ------------------------------------------------------------ formatting

  const decimal = new Intl.NumberFormat(undefined, {maximumFractionDigits: 1});
  const whole = new Intl.NumberFormat(undefined, {maximumFractionDigits: 0});

  function rate(value) {
    return value === null || value === undefined ? '–' : decimal.format(value);
  }

  function count(value) {
    return value === null || value === undefined ? '–' : whole.format(value);
  }

  function bytes(value) {
    if (value === null || value === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB'];
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return (unit ? decimal.format(value) : whole.format(value)) + ' ' + units[unit];
  }

  function seconds(value) {
    if (value === null || value === undefined) return '–';
    if (value === 0) return '0';
    if (value < 0.001) return whole.format(value * 1e6) + ' µs';
    if (value < 1) return decimal.format(value * 1000) + ' ms';
    return decimal.format(value) + ' s';
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], {
      hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false,
    });
  }

  // ----------------------------------------------------------------- charts

  function colours() {
    const style = getComputedStyle(document.documentElement);
    const read = (name) => style.getPropertyValue(name).trim();
    return {
      series: [1, 2, 3, 4, 5, 6, 7].map((i) => read('--series-' + i)),
      grid: read('--grid'),
      muted: read('--muted'),
    };
  }

  // The largest of 1, 2 and 5 times a power of ten that is at least x.
  function niceStep(x) {
    const power = Math.pow(10, Math.floor(Math.log10(x)));
    for (const factor of [1, 2, 5, 10]) {
      if (x <= factor * power) return factor * power;
    }
    return 10 * power;
  }

  class Chart {
    // A figure in #charts: its title and legend, and a canvas with this id.
    // series(samples) lists the lines: [{key, label, value(sample)}];
    // format writes a value; the axis steps by at least minStep, in
    // multiples of 1, 2 or 5 of a power of ten, or with base 1024 of 1024
    // (bytes: steps of 1, 2 or 5 KiB, MiB...).
    constructor(id, title, series, format, minStep, base) {
      const figure = document.createElement('figure');
      figure.className = 'panel chart';
      const caption = document.createElement('figcaption');
      const heading = document.createElement('span');
      heading.className = 'panel-title';
      heading.textContent = title;
      this.legend = document.createElement('span');
      this.legend.className = 'legend';
      caption.append(heading, this.legend);
      this.canvas = document.createElement('canvas');
      this.canvas.id = id;
      this.canvas.setAttribute('role', 'img');
      this.canvas.setAttribute('aria-label', title);
      figure.append(caption, this.canvas);
      $('charts').append(figure);
      this.series = series;
      this.format = format;
      this.minStep = minStep;
      this.base = base || 1;
    }

    draw(points, palette) {
      const lines = this.series(points);
      this.drawLegend(lines, points, palette);
      const canvas = this.canvas;
      const width = canvas.clientWidth;
      const height = canvas.clientHeight;
      if (!width || !height) return;
      const ratio = window.devicePixelRatio || 1;
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
      const g = canvas.getContext('2d');
      g.setTransform(ratio, 0, 0, ratio, 0, 0);
      g.clearRect(0, 0, width, height);

      const now = points.length ? points[points.length - 1].t : Date.now() / 1000;
      const first = points.length ? points[0].t : now;
      const start = Math.max(now - WINDOW, Math.min(first, now - MIN_SPAN));
      let max = 0;
      for (const line of lines) {
        for (const point of points) {
          const value = line.value(point);
          if (value !== null && value > max) max = value;
        }
      }
      let unit = 1;
      while (this.base > 1 && max >= unit * this.base) unit *= this.base;
      const step = Math.max(this.minStep, unit * niceStep(max / unit / 4 || this.minStep / unit));
      const top = Math.max(step, Math.ceil(max / step) * step);
      const left = 64;
      const right = 8;
      const above = 8;
      const below = 20;
      const plotWidth = width - left - right;
      const plotHeight = height - above - below;
      const x = (t) => left + ((t - start) / (now - start)) * plotWidth;
      const y = (v) => above + plotHeight - (v / top) * plotHeight;

      g.font = '11px system-ui, sans-serif';
      g.lineWidth = 1;
      g.fillStyle = palette.muted;
      g.textBaseline = 'middle';
      g.textAlign = 'right';
      for (let v = 0; v <= top + step / 2; v += step) {
        g.strokeStyle = palette.grid;
        g.beginPath();
        g.moveTo(left, Math.round(y(v)) + 0.5);
        g.lineTo(width - right, Math.round(y(v)) + 0.5);
        g.stroke();
        g.fillText(this.format(v), left - 6, y(v));
      }
      g.textBaseline = 'alphabetic';
      g.textAlign = 'left';
      g.fillText(clock(start), left, height - 4);
      g.textAlign = 'right';
      g.fillText(clock(now), width - right, height - 4);

      g.lineWidth = 1.75;
      g.lineJoin = 'round';
      lines.forEach((line, index) => {
        g.strokeStyle = palette.series[index % palette.series.length];
        g.beginPath();
        let drawing = false;
        for (const point of points) {
          const value = line.value(point);
          if (value === null || point.t < start) {
            drawing = false;
            continue;
          }
          if (drawing) {
            g.lineTo(x(point.t), y(value));
          } else {
            g.moveTo(x(point.t), y(value));
            drawing = true;
          }
        }
        g.stroke();
      });
    }

    drawLegend(lines, points, palette) {
      const last = points.length ? points[points.length - 1] : null;
      const latest = {};
      const items = lines.map((line, index) => {
        const value = last ? line.value(last) : null;
        latest[line.key] = value;
        const item = document.createElement('span');
        const swatch = document.createElement('span');
        swatch.className = 'swatch';
        swatch.style.background = palette.series[index % palette.series.length];
        item.append(swatch, line.label + ' ' + this.format(value));
        return item;
      });
      if (!items.length) items.push(document.createTextNode('none'));
      this.legend.replaceChildren(...items);
      this.canvas.dataset.latest = JSON.stringify(latest);
      this.canvas.dataset.points = String(points.length);
    }
  }

  const total = (sample) => Object.values(sample.connections).reduce((a, b) => a + b, 0);

  function kindsOf(points) {
    const kinds = new Set(KINDS);
    for (const point of points) Object.keys(point.connections).forEach((kind) => kinds.add(kind));
    return [...kinds];
  }

  // The labels a by-label figure (refusals) has had in the window.
  function labelsOf(points, figure) {
    const labels = new Set();
    for (const point of points) Object.keys(point[figure] || {}).forEach((label) => labels.add(label));
    return [...labels].sort();
  }

  const byLabel = (figure) => (points) => labelsOf(points, figure).map(
    (label) => ({key: label, label, value: (s) => (s[figure] || {})[label] || 0}),
  );

  const single = (key, label) => () => [{key, label, value: (s) => s[key]}];

  const charts = [
    new Chart('chart-connections', 'Connections by kind', (points) => [
      {key: 'total', label: 'all', value: total},
      ...kindsOf(points).map((kind) => ({key: kind, label: kind, value: (s) => s.connections[kind] || 0})),
    ], count, 1),
    new Chart('chart-messages', 'Messages in /s', single('messages_in', 'in'), rate, 1),
    new Chart('chart-deliveries', 'Deliveries out /s', single('deliveries', 'out'), rate, 1),
    new Chart('chart-bytes', 'Bytes out /s', single('bytes_out', 'out'), bytes, 1024, 1024),
    new Chart('chart-fanout', 'Fan-out time', () => [
      {key: 'fan_out_mean', label: 'mean', value: (s) => s.fan_out_mean},
      {key: 'fan_out_p95', label: '95th percentile ≤', value: (s) => s.fan_out_p95},
    ], seconds, 0.0001),
    new Chart('chart-cuts', 'Cut off and rate-limited /s', () => [
      {key: 'slow_consumers', label: 'slow consumers', value: (s) => s.slow_consumers},
      {key: 'rate_limited', label: 'rate-limited messages', value: (s) => s.rate_limited},
    ], rate, 1),
    new Chart('chart-refused', 'Refused handshakes /s, by reason', byLabel('refused'), rate, 1),
    new Chart('chart-requests', 'Refused HTTP requests /s, by status', byLabel('refused_requests'), rate, 1),
  ];

  function tile(id, value, text) {
    const element = $(id);
    element.dataset.value = value === null || value === undefined ? '' : String(value);
    element.querySelector('.tile-value').textContent = text;
  }

  function draw() {
    drawQueued = false;
    const last = samples.length ? samples[samples.length - 1] : null;
    if (last) {
      tile('tile-connections', total(last), count(total(last)));
      tile('tile-messages', last.messages_in, rate(last.messages_in));
      tile('tile-deliveries', last.deliveries, rate(last.deliveries));
      tile('tile-bytes', last.bytes_out, bytes(last.bytes_out));
      tile('tile-fanout', last.fan_out_mean, seconds(last.fan_out_mean));
      tile('tile-rooms', last.rooms, count(last.rooms));
    }
    const palette = colours();
    for (const chart of charts) chart.draw(samples, palette);
  }

  function redraw() {
    if (!drawQueued) {
      drawQueued = true;
      requestAnimationFrame(draw);
    }
  }

  // ---------------------------------------------------------------- status

  function setStatus(state, text) {
    const status = $('status');
    status.dataset.state = state;
    status.textContent = text;
  }

  function showScope() {
    const nodes = nodesInfo ? nodesInfo.nodes.length : 1;
    $('scope').textContent = node === null ? '' : nodes > 1
      ? 'Figures and charts: node ' + node + ' only, one of ' + nodes + ' nodes. Rooms and nodes: all nodes.'
      : 'Figures and charts: node ' + node + ', the only node.';
  }

  // ------------------------------------------------------------ the server

  function authorized(init = {}) {
    return {...init, cache: 'no-store', headers: {...(init.headers || {}), Authorization: 'Bearer ' + key}};
  }

  // A request of the signed-in page: {ok, status, body}; a 401 signs out.
  async function call(path, init) {
    const response = await fetch(path, authorized(init));
    if (response.status === 401) {
      signOut('The server refused the key: sign in again.');
      throw new Refused();
    }
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    return {ok: response.ok, status: response.status, body};
  }

  function post(path, body) {
    return call(path, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
  }

  // ------------------------------------------------------- signing in, out

  async function signIn(candidate, remembered) {
    key = candidate;
    setStatus('connecting', 'Signing in…');
    let response;
    try {
      response = await fetch('/admin/nodes', authorized());
    } catch (error) {
      signOut('The server cannot be reached: try again.');
      return;
    }
    if (response.status === 401) {
      signOut(remembered ? 'The key this tab kept was refused: sign in again.' : 'That key is not accepted.');
      return;
    }
    if (!response.ok) {
      signOut('The server answered ' + response.status + ': try again.');
      return;
    }
    sessionStorage.setItem(KEY_STORE, candidate);
    $('sign-in').hidden = true;
    $('dashboard').hidden = false;
    $('sign-out').hidden = false;
    showNodes(await response.json());
    follow();
    nodesTimer = setInterval(refreshNodes, NODES_EVERY_MS);
  }

  function signOut(why) {
    key = null;
    sessionStorage.removeItem(KEY_STORE);
    if (stream !== null) stream.abort();
    stream = null;
    clearTimeout(retryTimer);
    clearInterval(nodesTimer);
    samples = [];
    node = null;
    nodesInfo = null;
    roomShown = null;
    // Nothing the key showed stays on the page.
    for (const id of ['rooms-by-members', 'rooms-by-rate', 'nodes']) {
      $(id).querySelector('tbody').replaceChildren();
    }
    for (const id of ['room-members', 'room-history', 'backplane']) $(id).replaceChildren();
    $('room-detail').hidden = true;
    $('action-result').textContent = '';
    $('scope').textContent = '';
    $('dashboard').hidden = true;
    $('sign-out').hidden = true;
    $('sign-in').hidden = false;
    $('sign-in-error').textContent = why;
    setStatus('signed-out', 'Signed out');
    $('key').focus();
  }

  // ------------------------------------------------------------ the stream

  function follow() {
    clearTimeout(retryTimer);
    const controller = new AbortController();
    stream = controller;
    setStatus('connecting', 'Connecting…');
    read(controller).catch(() => null).then(() => {
      if (stream === controller && key !== null) {
        setStatus('reconnecting', 'Reconnecting…');
        retryTimer = setTimeout(follow, RETRY_MS);
      }
    });
  }

  async function read(controller) {
    const response = await fetch('/admin/stream', authorized({signal: controller.signal}));
    if (response.status === 401) {
      signOut('The server refused the key: sign in again.');
      return;
    }
    if (!response.ok || !response.body) throw new Error('HTTP ' + response.status);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  }

  // One event of the stream: "event:" and "data:" lines (comments skipped).
  function dispatch(block) {
    let name = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') name = value;
      else if (field === 'data') data.push(value);
    }
    if (!data.length) return;
    const payload = JSON.parse(data.join('\n'));
    if (name === 'backlog') {
      // The server's window replaces ours: after a reconnection it may
      // even be another node's (--workers).
      node = payload.node;
      samples = payload.samples;
      showScope();
      setStatus('live', 'Live');
      redraw();
    } else if (name === 'sample') {
      samples.push(payload);
      while (samples.length && samples[0].t < payload.t - WINDOW) samples.shift();
      setStatus('live', 'Live');
      redraw();
    } else if (name === 'rooms') {
      showRooms(payload);
    }
  }

  // ----------------------------------------------------------------- rooms

  function cell(text, className) {
    const td = document.createElement('td');
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function roomRows(tableId, entries, empty) {
    const rows = entries.map((entry) => {
      const tr = document.createElement('tr');
      tr.dataset.room = entry.room;
      const name = document.createElement('td');
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'link';
      button.textContent = '#' + entry.room;
      button.addEventListener('click', () => openRoom(entry.room).catch(() => null));
      name.append(button);
      tr.append(name, cell(count(entry.members), 'num'), cell(rate(entry.rate), 'num'));
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement('tr');
      const td = cell(empty, 'empty');
      td.colSpan = 3;
      tr.append(td);
      rows.push(tr);
    }
    $(tableId).querySelector('tbody').replaceChildren(...rows);
  }

  function showRooms(rooms) {
    roomRows('rooms-by-members', rooms.by_members, 'Nobody is in any room.');
    roomRows('rooms-by-rate', rooms.by_rate, 'Nothing said in the last second.');
  }

  const roomPath = (room, what) => '/api/rooms/' + encodeURIComponent(room) + '/' + what;

  function listNote(listId, text) {
    const li = document.createElement('li');
    li.className = 'meta';
    li.textContent = text;
    $(listId).append(li);
  }

  async function openRoom(room) {
    roomShown = room;
    roomNext = null;
    $('room-detail').hidden = false;
    $('room-detail-name').textContent = room;
    $('room-count').textContent = '';
    $('room-members').replaceChildren();
    $('room-history').replaceChildren();
    $('room-more').hidden = true;
    $('announce-room').value = room;
    await Promise.all([loadMembers(null), loadHistory()]);
  }

  async function loadMembers(cursor) {
    const room = roomShown;
    const query = cursor ? '?cursor=' + encodeURIComponent(cursor) : '';
    const {ok, status, body} = await call(roomPath(room, 'presence') + query);
    if (room !== roomShown) return;
    if (!ok) {
      listNote('room-members', (body && body.error) || 'HTTP ' + status);
      return;
    }
    $('room-count').textContent = count(body.count);
    for (const member of body.members) {
      const li = document.createElement('li');
      li.dataset.id = member.id || '';
      li.dataset.user = member.user || '';
      const who = document.createElement('span');
      who.className = 'who';
      who.textContent = member.name || '(no name)';
      const meta = document.createElement('span');
      meta.className = 'meta';
      meta.textContent = member.user
        ? 'user ' + member.user + ' · ' + member.connections + ' conn.'
        : member.id;
      const pick = document.createElement('button');
      pick.type = 'button';
      pick.className = 'quiet small';
      pick.textContent = 'Disconnect…';
      pick.title = 'Fill in the disconnect form';
      pick.addEventListener('click', () => {
        $('disconnect-kind').value = member.user ? 'user' : 'client';
        $('disconnect-target').value = member.user || member.id;
        $('disconnect-reason').focus();
      });
      li.append(who, meta, pick);
      $('room-members').append(li);
    }
    if (!body.members.length && !cursor) listNote('room-members', 'Nobody is here.');
    roomNext = body.next;
    $('room-more').hidden = !roomNext;
  }

  async function loadHistory() {
    const room = roomShown;
    const {ok, status, body} = await call(roomPath(room, 'history') + '?limit=' + HISTORY_SHOWN);
    if (room !== roomShown) return;
    $('room-history').replaceChildren();
    if (!ok) {
      listNote('room-history', (body && body.error) || 'HTTP ' + status);
      return;
    }
    for (const message of body.messages) {
      const li = document.createElement('li');
      const meta = document.createElement('span');
      meta.className = 'meta';
      meta.textContent = clock(message.ts) + ' ' + (message.name || message.from) + ': ';
      const text = document.createElement('span');
      text.className = 'text';
      text.textContent = message.text;
      li.append(meta, text);
      $('room-history').append(li);
    }
    if (!body.messages.length) listNote('room-history', 'No messages kept.');
  }

  // ----------------------------------------------------------------- nodes

  function fact(term, text, bad) {
    const dt = document.createElement('dt');
    dt.textContent = term;
    const dd = document.createElement('dd');
    dd.textContent = text;
    if (bad) dd.className = 'bad';
    return [dt, dd];
  }

  function showNodes(info) {
    nodesInfo = info;
    const rows = info.nodes.map((entry) => {
      const tr = document.createElement('tr');
      tr.dataset.node = entry.node;
      let heartbeat = entry.heartbeat_age === null ? '—' : decimal.format(entry.heartbeat_age) + ' s ago';
      if (!entry.alive) heartbeat = 'stopped';
      tr.append(
        cell(entry.node + (entry.here ? ' (this node)' : '')),
        cell(count(entry.connections), 'num'),
        cell(heartbeat, 'num'),
      );
      return tr;
    });
    $('nodes').querySelector('tbody').replaceChildren(...rows);
    const state = info.backplane;
    const facts = [
      fact('Kind', state.kind === 'redis' ? 'Redis' : 'in-process: this node alone'),
      fact('Connected', state.connected ? 'yes' : 'no', !state.connected),
    ];
    if (state.url) facts.push(fact('Address', state.url));
    // Several --redis servers: each one's own state (its rooms are served
    // on each node alone while it is unreachable).
    (Array.isArray(state.shards) ? state.shards : []).forEach((shard, i) => {
      const up = Boolean(shard.connected);
      facts.push(fact(`Server ${i + 1} of ${state.shards.length}`,
        `${shard.url}${up ? '' : ' (unreachable: its rooms served here alone)'}`, !up));
    });
    if (state.namespace) facts.push(fact('Namespace', state.namespace));
    if (state.nodes !== undefined) facts.push(fact('Nodes known', count(state.nodes)));
    if (state.down_for !== undefined) {
      facts.push(fact('Unreachable for', decimal.format(state.down_for) + ' s', true));
      facts.push(fact('Delivered only here', count(state.local_only) + ' messages', true));
    }
    $('backplane').replaceChildren(...facts.flat());
    showScope();
  }

  async function refreshNodes() {
    try {
      const {ok, body} = await call('/admin/nodes');
      if (ok) showNodes(body);
    } catch (error) {
      // Signed out (a 401), or the server is away: the stream says so.
    }
  }

  // --------------------------------------------------------------- actions

  function result(text, state) {
    const element = $('action-result');
    element.dataset.state = state || '';
    element.textContent = text;
  }

  async function act(what, request, done) {
    result(what + '…');
    let answer;
    try {
      answer = await request();
    } catch (error) {
      if (!(error instanceof Refused)) result('The server cannot be reached.', 'error');
      return;
    }
    if (answer.ok) {
      result(done(answer.body), 'ok');
    } else {
      result(what + ' failed: ' + ((answer.body && answer.body.error) || 'HTTP ' + answer.status), 'error');
    }
  }

  // ---------------------------------------------------------------- wiring

  $('sign-in-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const candidate = $('key').value.trim();
    $('key').value = '';
    $('sign-in-error').textContent = '';
    if (candidate) signIn(candidate, false);
  });

  $('sign-out').addEventListener('click', () => signOut(''));

  $('room-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const room = $('room-name').value.trim();
    if (room) openRoom(room).catch(() => null);
  });

  $('room-more').addEventListener('click', () => loadMembers(roomNext).catch(() => null));

  $('room-close').addEventListener('click', () => {
    roomShown = null;
    $('room-detail').hidden = true;
  });

  $('disconnect-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const kind = $('disconnect-kind').value;
    const target = $('disconnect-target').value.trim();
    const reason = $('disconnect-reason').value.trim();
    if (!target) return;
    const body = {[kind]: target};
    if (reason) body.reason = reason;
    act('Disconnecting ' + kind + ' ' + target, () => post('/api/disconnect', body), (answer) =>
      'Disconnected ' + kind + ' ' + target + ': ' + answer.disconnected + ' connection(s) on this node.');
  });

  $('announce-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const room = $('announce-room').value.trim();
    const text = $('announce-text').value;
    if (!room || !text) return;
    act('Announcing in #' + room, () => post('/api/publish', {room, text}), (answer) => {
      $('announce-text').value = '';
      if (roomShown === room) loadHistory().catch(() => null);
      return 'Announced in #' + room + ' (message ' + answer.seq + ').';
    });
  });

  window.addEventListener('resize', redraw);

  const remembered = sessionStorage.getItem(KEY_STORE);
  if (remembered) {
    signIn(remembered, true);
  } else {
    $('key').focus();
  }
})();
