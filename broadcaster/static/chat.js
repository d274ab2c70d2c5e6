/*
 * The broadcaster chat page.
 *
 * Talks to the server it was loaded from over one WebSocket, in the
 * "broadcaster.json" subprotocol (see broadcaster/wire.py):
 *
 *   server -> page   {"type": "welcome", "id": ID, "members": [{"id": ...}, ...]}   first
 *                    {"type": "join" | "leave", "id": ID, "ts": secs}
 *                    {"type": "message", "from": ID, "text": TEXT, "ts": secs}
 *                    {"type": "binary", "from": ID, "size": N, "ts": secs}
 *                        then one binary WebSocket message holding the N bytes
 *                    {"type": "image", "from": ID, "width": W, "height": H, "size": N, ...}
 *                        then one binary WebSocket message holding the PNG
 *                    {"type": "error", "reason": TEXT}
 *   page -> server   {"type": "message", "text": TEXT}
 *
 * The server sends every message to everyone, the sender included, so the
 * page shows its own messages when their echo arrives rather than on send:
 * what is on screen is what everyone else saw.
 *
 * Everything shown comes from other people: the DOM is built with
 * createElement and textContent only, never innerHTML.
 */
(() => {
  'use strict';

  const SUBPROTOCOL = 'broadcaster.json';

  // Reconnection: wait BACKOFF_MIN_MS after the first drop, doubling on each
  // failed attempt up to BACKOFF_MAX_MS.  Each wait is jittered by +/-50% so
  // that a restarted server is not hit by every page at the same instant.
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const JITTER = 0.5;

  // Entries kept in the log; older ones are dropped so a page left open for
  // days does not grow without bound.
  const MAX_ENTRIES = 1000;

  // Sender colours: a few classes in chat.css (inline styles are forbidden by
  // the page's Content-Security-Policy).
  const SENDER_COLOURS = 8;

  const statusEl = document.getElementById('status');
  const membersEl = document.getElementById('members');
  const memberCountEl = document.getElementById('member-count');
  const messagesEl = document.getElementById('messages');
  const composeEl = document.getElementById('compose');
  const textEl = document.getElementById('text');
  const sendEl = document.getElementById('send');

  /** The current socket; events from an older, replaced one are ignored. */
  let socket = null;
  /** Our id on the current connection, from its welcome. */
  let myId = null;
  /** Ids present, in the order they arrived (a Set keeps insertion order). */
  let members = new Set();
  /** The "binary" or "image" header whose bytes are the next binary message. */
  let pendingBinary = null;

  let backoffMs = BACKOFF_MIN_MS;
  let reconnectTimer = null;
  let countdownTimer = null;
  /** Whether we have been connected before: decides "Connected" vs "Reconnected". */
  let everConnected = false;
  /** Whether the "cannot reach the server" notice was shown (once per page). */
  let toldUnreachable = false;
  /** Whether the text box had focus when it was disabled, to give it back. */
  let hadFocus = false;

  // ---------------------------------------------------------------- helpers

  /**
   * Create an element with optional class names and text.  The text always
   * goes through textContent, so markup in it is shown, never parsed.
   */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  /** A stable colour class for an id, so each sender keeps one colour. */
  function colourClass(id) {
    let hash = 0;
    for (const ch of String(id)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    return `c${hash % SENDER_COLOURS}`;
  }

  /** A <time> element for a server timestamp (seconds since the epoch). */
  function timeEl(ts) {
    const when = typeof ts === 'number' && Number.isFinite(ts) ? new Date(ts * 1000) : new Date();
    const node = el('time', 'time', when.toLocaleTimeString([], {
      hour: '2-digit', minute: '2-digit', second: '2-digit',
    }));
    node.dateTime = when.toISOString();
    node.title = when.toLocaleString();
    return node;
  }

  // ------------------------------------------------------------- the log

  /** Whether the log is scrolled (nearly) to the bottom. */
  function atBottom() {
    return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 40;
  }

  function scrollToBottom() {
    messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  /**
   * Append an entry to the log.  Follows new entries only if the reader was
   * already at the bottom, so scrolling back to read is not interrupted.
   *
   * @returns {boolean} whether the log is following new entries.
   */
  function append(entry) {
    const follow = atBottom();
    messagesEl.append(entry);
    while (messagesEl.childElementCount > MAX_ENTRIES) {
      messagesEl.firstElementChild.remove();
    }
    if (follow) scrollToBottom();
    return follow;
  }

  /** A one-line notice: joins, leaves, connection changes, errors. */
  function notice(text, kind = 'info') {
    const entry = el('li', `entry notice ${kind}`);
    entry.append(timeEl(Date.now() / 1000), el('span', 'text', text));
    append(entry);
  }

  /** The start of a message-like entry: who sent it, when, and whether it was us. */
  function senderEntry(className, from, ts) {
    const mine = from === myId;
    const entry = el('li', `entry ${className}${mine ? ' mine' : ''}`);
    entry.dataset.from = from;
    const meta = el('div', 'meta');
    meta.append(el('span', `from ${colourClass(from)}`, from));
    if (mine) meta.append(el('span', 'you', 'you'));
    meta.append(timeEl(ts));
    entry.append(meta);
    return entry;
  }

  function showMessage(event) {
    const entry = senderEntry('message', String(event.from), event.ts);
    entry.append(el('p', 'text', event.text));
    append(entry);
  }

  // Magic numbers of the image formats every browser displays.  SVG is left
  // out on purpose: it is a document, not just pixels.
  const IMAGE_SIGNATURES = [
    { type: 'image/png', bytes: [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a] },
    { type: 'image/jpeg', bytes: [0xff, 0xd8, 0xff] },
    { type: 'image/gif', bytes: [0x47, 0x49, 0x46, 0x38] }, // "GIF8" (87a or 89a)
    // "RIFF", a 4-byte length, then "WEBP".
    { type: 'image/webp', bytes: [0x52, 0x49, 0x46, 0x46], at8: [0x57, 0x45, 0x42, 0x50] },
  ];

  /** The image MIME type of these bytes, or null if they are not an image we show. */
  function imageType(bytes) {
    const startsWith = (sig, offset = 0) =>
      bytes.length >= offset + sig.length && sig.every((b, i) => bytes[offset + i] === b);
    for (const sig of IMAGE_SIGNATURES) {
      if (startsWith(sig.bytes) && (!sig.at8 || startsWith(sig.at8, 8))) return sig.type;
    }
    return null;
  }

  /** What to say about a binary message. */
  function describeBinary(header, from, size) {
    if (header && header.type === 'image') {
      const dims = Number.isInteger(header.width) && Number.isInteger(header.height)
        ? ` (${header.width}×${header.height})` : '';
      return `${from} sent an image${dims}`;
    }
    return `${from} sent ${size} bytes of binary data`;
  }

  /**
   * Show a binary message: its size, and the picture when the bytes are an
   * image.  `header` is the "binary" or "image" event announcing it, or null
   * if the bytes arrived unannounced.
   */
  function showBinary(header, buffer) {
    const bytes = new Uint8Array(buffer);
    const from = header ? String(header.from) : '?';
    const entry = senderEntry('binary', from, header ? header.ts : null);
    entry.append(el('p', 'text', describeBinary(header, from, bytes.length)));
    const type = imageType(bytes);
    let img = null;
    let url = null;
    if (type) {
      url = URL.createObjectURL(new Blob([bytes], { type }));
      img = el('img', 'picture');
      img.alt = `image from ${from}`;
      entry.append(img);
    }
    const follow = append(entry);
    if (img) {
      img.addEventListener('load', () => {
        // Once decoded, the picture no longer needs its Blob.
        URL.revokeObjectURL(url);
        // It is taller now than when appended: stay at the bottom.
        if (follow) scrollToBottom();
      }, { once: true });
      img.addEventListener('error', () => {
        URL.revokeObjectURL(url);
        img.remove();
      }, { once: true });
      img.src = url;
    }
  }

  // ---------------------------------------------------------- the members

  function renderMembers() {
    membersEl.replaceChildren(...[...members].map((id) => {
      const item = el('li', id === myId ? 'member me' : 'member');
      item.dataset.id = id;
      item.append(el('span', `dot ${colourClass(id)}`), el('span', 'name', id));
      if (id === myId) item.append(el('span', 'you', 'you'));
      return item;
    }));
    memberCountEl.textContent = String(members.size);
  }

  // --------------------------------------------------- connection status

  /** Show the connection state in the header, and enable sending only when connected. */
  function setStatus(state, text) {
    statusEl.dataset.state = state;
    statusEl.textContent = text;
    if (state === 'connected') {
      statusEl.dataset.id = myId;
    } else {
      delete statusEl.dataset.id;
    }
    const connected = state === 'connected';
    // Offline, the member list is only who was here last: show it as such.
    membersEl.classList.toggle('stale', !connected);
    if (!connected && document.activeElement === textEl) hadFocus = true;
    textEl.disabled = !connected;
    sendEl.disabled = !connected;
    if (connected && hadFocus) {
      hadFocus = false;
      textEl.focus();
    }
  }

  // -------------------------------------------------------- the protocol

  function handleEvent(event) {
    switch (event.type) {
      case 'welcome': {
        myId = String(event.id);
        // A new connection's welcome is the whole truth: forget the old list.
        const listed = (event.members || []).filter((m) => m && m.id != null);
        members = new Set(listed.map((m) => String(m.id)));
        members.add(myId);
        renderMembers();
        setStatus('connected', `Connected as ${myId}`);
        notice(everConnected ? `Reconnected as ${myId}` : `Connected as ${myId}`, 'ok');
        everConnected = true;
        break;
      }
      case 'join': {
        const id = String(event.id);
        // Our own join follows our welcome, which already announced us.
        if (id === myId) break;
        members.add(id);
        renderMembers();
        notice(`${id} joined`);
        break;
      }
      case 'leave': {
        const id = String(event.id);
        members.delete(id);
        renderMembers();
        notice(`${id} left`);
        break;
      }
      case 'message':
        showMessage(event);
        break;
      case 'binary':
      case 'image':
        // The bytes follow as the next binary message.
        pendingBinary = event;
        break;
      case 'error':
        notice(`Server error: ${event.reason}`, 'error');
        break;
      default:
        // A newer server may send more; ignore what we do not understand.
        console.debug('broadcaster: ignoring event of type', event.type);
    }
  }

  function onMessage(message) {
    if (message.data instanceof ArrayBuffer) {
      showBinary(pendingBinary, message.data);
      pendingBinary = null;
      return;
    }
    let event;
    try {
      event = JSON.parse(message.data);
    } catch (e) {
      console.warn('broadcaster: ignoring a message that is not JSON', e);
      return;
    }
    if (event && typeof event === 'object') handleEvent(event);
  }

  // ------------------------------------------------ connect and reconnect

  /** The WebSocket URL: this page's host and query (e.g. ?name=ann), path "/". */
  function socketUrl() {
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    return `${scheme}${location.host}/${location.search}`;
  }

  function connect() {
    reconnectTimer = null;
    clearInterval(countdownTimer);
    countdownTimer = null;
    setStatus('connecting', everConnected ? 'Reconnecting…' : 'Connecting…');

    let ws;
    try {
      ws = new WebSocket(socketUrl(), SUBPROTOCOL);
    } catch (e) {
      // Only a malformed URL throws here; treat it like a failed attempt.
      console.error('broadcaster: cannot open WebSocket', e);
      onDisconnect({ code: 0, reason: String(e) });
      return;
    }
    ws.binaryType = 'arraybuffer';
    socket = ws;
    pendingBinary = null;

    // Every handler checks it still belongs to the current socket: a late
    // event from a replaced one must not touch the page.
    ws.addEventListener('open', () => {
      if (ws !== socket) return;
      // The server accepted us: the next drop starts the backoff afresh.
      backoffMs = BACKOFF_MIN_MS;
    });
    ws.addEventListener('message', (message) => {
      if (ws === socket) onMessage(message);
    });
    ws.addEventListener('close', (close) => {
      if (ws !== socket) return;
      socket = null;
      onDisconnect(close);
    });
    // An 'error' is always followed by 'close', which does the work.
  }

  function onDisconnect(close) {
    const wasConnected = myId !== null;
    myId = null;
    pendingBinary = null;
    const delayMs = scheduleReconnect();
    const retry = `reconnecting in ${(delayMs / 1000).toFixed(1)} s`;
    // Say so in the log once per outage; the header counts down each retry.
    if (wasConnected) {
      const why = close.reason ? `: ${close.reason}` : '';
      notice(`Disconnected (code ${close.code}${why}); ${retry}…`, 'connection');
    } else if (!everConnected && !toldUnreachable) {
      toldUnreachable = true;
      notice(`Cannot reach the server; ${retry}…`, 'connection');
    }
  }

  /**
   * Connect again after a backoff with jitter; the header counts down.
   *
   * @returns {number} the delay chosen, in milliseconds.
   */
  function scheduleReconnect() {
    const jitter = 1 + JITTER * (2 * Math.random() - 1);
    const delayMs = Math.round(backoffMs * jitter);
    backoffMs = Math.min(backoffMs * 2, BACKOFF_MAX_MS);

    const due = Date.now() + delayMs;
    const showCountdown = () => {
      const seconds = Math.max(1, Math.ceil((due - Date.now()) / 1000));
      setStatus('waiting', `Reconnecting in ${seconds} s`);
    };
    showCountdown();
    countdownTimer = setInterval(showCountdown, 1000);
    reconnectTimer = setTimeout(connect, delayMs);
    return delayMs;
  }

  // Back online after a network outage: no need to sit out the backoff.
  window.addEventListener('online', () => {
    if (reconnectTimer !== null) {
      clearTimeout(reconnectTimer);
      connect();
    }
  });

  // ------------------------------------------------------------- sending

  composeEl.addEventListener('submit', (submit) => {
    submit.preventDefault();
    const text = textEl.value;
    if (text.trim() === '' || socket === null || socket.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ type: 'message', text }));
    // No local copy: the server's echo is what shows the message.
    textEl.value = '';
    textEl.focus();
  });

  connect();
})();
