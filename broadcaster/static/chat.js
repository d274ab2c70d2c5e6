/*
 * The broadcaster chat page.
 *
 * Talks to the server it was loaded from over one WebSocket, in the
 * "broadcaster.json" subprotocol (broadcaster/protocols/wire.py and docs/protocols.rst
 * describe every field):
 *
 *   server -> page   welcome {id, name, room, members, count, next, epoch, seq, limits}   first
 *                    join | leave | rename {room, id, name, ts, user?, connections?}
 *                    message {room, from, name, text, ts, seq, epoch}
 *                    binary {room, from, size, ts} | image {room, from, width, height, ...}
 *                        each followed by one binary WebSocket message: the bytes
 *                    presence {room, members, count, next, cursor, epoch, seq}
 *                        the answer to every join, and to who
 *                    ack {ref, room, seq, epoch}            a message of ours was numbered
 *                    recovered {room, complete}             a replay is over
 *                    error {reason, ref?}
 *   page -> server   message {room, text, ref}, join {room, since?, ref},
 *                    leave {room}, hello {name, ref}, who {room, cursor}
 *
 * Members.  A room's welcome or presence lists its first members (a page)
 * and how many there are; "Show more" asks for the next page with who and
 * the "next" cursor, and join and leave events keep the list and the count
 * up to date in between.  A signed-in user is one member however many
 * connections it has (listed with its "user"; the server announces its
 * first connection's join and its last one's leave); an anonymous
 * connection is one member (listed with its "id").
 *
 * Rooms.  Every connection starts in the lobby.  The page also joins the
 * rooms it remembers (localStorage) and those the user asks for; each room
 * keeps its own log and member list, and the view shows the selected one.
 *
 * Names.  The display name comes from the page's own ?name=, else from
 * localStorage; it is passed as ?name= when connecting and changed with
 * hello.  Ids stay the key: a name is only what is shown.
 *
 * Recovery.  Per room the page keeps a cursor: the epoch and seq of the last
 * message seen there (before any, where the room stood when the page
 * joined it).  After a drop it reconnects with ?since=<epoch>:<seq> for the
 * lobby and sends join with since for the other rooms; the server replays
 * what was missed, in order and before anything live, then sends
 * "recovered".  complete: false means some messages are gone for good, and
 * the room's log says so.  Messages are also deduplicated by (epoch, seq)
 * per room, in case the same one ever arrives twice.
 *
 * Pictures come only from image events: the server has re-encoded those
 * as PNG with Pillow.  A binary message is any client's bytes, unchecked,
 * so it is never shown, whatever it looks like; the log says who sent how
 * many bytes and offers them for download (application/octet-stream).
 *
 * Own messages are shown as pending until their echo (a room's messages go
 * to all its members, the sender included) replaces them: what is on
 * screen is what everyone else saw.  An error carrying the message's ref
 * marks it failed.
 *
 * Everything shown comes from other people: the DOM is built with
 * createElement and textContent only, never innerHTML.
 */
(() => {
  'use strict';

  const SUBPROTOCOL = 'broadcaster.json';
  const LOBBY = 'lobby';

  // Reconnection: wait BACKOFF_MIN_MS after the first drop, doubling on each
  // failed attempt up to BACKOFF_MAX_MS.  Each wait is jittered by +/-50% so
  // that a restarted server is not hit by every page at the same instant.
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const JITTER = 0.5;

  // How long the object URL of a download lives: the browser has long
  // started reading the Blob by then.
  const DOWNLOAD_URL_LIFETIME_MS = 60000;

  // Entries kept in each room's log; older ones are dropped so a page left
  // open for days does not grow without bound.
  const MAX_ENTRIES = 1000;

  // Sender colours: a few classes in chat.css (inline styles are forbidden by
  // the page's Content-Security-Policy).
  const SENDER_COLOURS = 8;

  // The server's rules for names (broadcaster/names.py), checked here first
  // so that the user learns at once, and so that a remembered name the
  // server would refuse never makes the handshake fail.
  const ROOM_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;
  const MAX_ROOM_LENGTH = 64;
  const NAME_FORBIDDEN = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}]/u;

  // The server's defaults, until its welcome tells the real limits.
  const DEFAULT_LIMITS = {
    max_message_size: 64 * 1024,
    max_name_length: 32,
    max_rooms_per_client: 100,
  };

  const STORED_NAME = 'broadcaster.name';
  const STORED_ROOMS = 'broadcaster.rooms';

  const statusEl = document.getElementById('status');
  const roomsEl = document.getElementById('rooms');
  const joinFormEl = document.getElementById('join-room');
  const roomNameEl = document.getElementById('room-name');
  const roomErrorEl = document.getElementById('room-error');
  const nameFormEl = document.getElementById('name');
  const displayNameEl = document.getElementById('display-name');
  const nameErrorEl = document.getElementById('name-error');
  const peopleTitleEl = document.getElementById('people-room');
  const membersEl = document.getElementById('members');
  const memberCountEl = document.getElementById('member-count');
  const moreMembersEl = document.getElementById('more-members');
  const roomTitleEl = document.getElementById('room-title');
  const messagesEl = document.getElementById('messages');
  const composeEl = document.getElementById('compose');
  const textEl = document.getElementById('text');
  const sendEl = document.getElementById('send');
  const composeErrorEl = document.getElementById('compose-error');
  const baseTitle = document.title;

  /** The current socket; events from an older, replaced one are ignored. */
  let socket = null;
  /** Our id on the current connection, from its welcome. */
  let myId = null;
  /**
   * How the rooms list us: as our user if we signed in (one member however
   * many tabs we have open), else as this connection.
   */
  let myKey = null;
  /** Every id this page has had: replayed messages carry the old ones. */
  const myIds = new Set();
  /** Our display name as the server knows it (null: none). */
  let myName = null;
  /** The server's limits, from its last welcome. */
  let limits = { ...DEFAULT_LIMITS };
  /** The name we want: from ?name= or localStorage, or set in the form. */
  let wantedName = initialName();
  /** Counts welcomes: which connection a pending message was sent on. */
  let connectionNumber = 0;
  /** Whether the current connection's URL asked for the lobby's replay. */
  let lobbySinceSent = false;
  /** The "binary" or "image" header whose bytes are the next binary message. */
  let pendingBinary = null;

  /** Room name -> room state (see makeRoom), the lobby first. */
  const rooms = new Map();
  let activeRoom = LOBBY;

  /** Our messages awaiting their echo: ref -> {room, text, entry, connection}. */
  const pending = new Map();
  /** Other requests awaiting an answer: ref -> {kind: 'join' | 'hello', ...}. */
  const requests = new Map();
  let refCounter = 0;

  let backoffMs = BACKOFF_MIN_MS;
  let reconnectTimer = null;
  let countdownTimer = null;
  /** Whether we have been connected before: decides "Connected" vs "Reconnected". */
  let everConnected = false;
  /** Whether the "cannot reach the server" notice was shown (once per page). */
  let toldUnreachable = false;
  /** Attempts in a row that failed before the socket opened. */
  let failedAttempts = 0;
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

  /**
   * Connection ids never contain ':', so a signed-in user's key is never one.
   */
  const USER_KEY = 'user:';

  /** What to call a member: its name, or its id (or user) if it has none. */
  function label(id, name) {
    if (typeof name === 'string' && name !== '') return name;
    const key = String(id);
    return key.startsWith(USER_KEY) ? key.slice(USER_KEY.length) : key;
  }

  /**
   * The key of a member in a room's list, from a presence entry or a
   * join, leave or rename: a signed-in user is one member, whichever of its
   * connections the event is about; an anonymous connection is one itself.
   */
  function memberKey(member) {
    if (member.user != null) return USER_KEY + String(member.user);
    return member.id != null ? String(member.id) : null;
  }

  /** The name a member goes by in any room we share with it, or null. */
  function knownName(id) {
    for (const room of rooms.values()) {
      const name = room.members.get(id);
      if (name) return name;
    }
    return null;
  }

  function nextRef(kind) {
    refCounter += 1;
    return `${kind}${refCounter}`;
  }

  function connected() {
    return socket !== null && socket.readyState === WebSocket.OPEN && myId !== null;
  }

  function send(request) {
    socket.send(JSON.stringify(request));
  }

  // localStorage can be missing, full or forbidden: the page works without it.
  function loadStored(key) {
    try {
      return window.localStorage.getItem(key);
    } catch (e) {
      return null;
    }
  }

  function store(key, value) {
    try {
      if (value === null) {
        window.localStorage.removeItem(key);
      } else {
        window.localStorage.setItem(key, value);
      }
    } catch (e) {
      console.debug('broadcaster: cannot use localStorage', e);
    }
  }

  /** Why `name` is not a room name the server accepts, or null if it is one. */
  function roomProblem(name) {
    if (name.length < 1 || name.length > MAX_ROOM_LENGTH) {
      return `A room name has 1 to ${MAX_ROOM_LENGTH} characters.`;
    }
    if (!ROOM_PATTERN.test(name)) {
      return "A room name may contain only letters, digits, '_', '.' and '-', " +
        'and starts with a letter or digit.';
    }
    return null;
  }

  /** Why `name` (already trimmed) is not a display name the server accepts, or null. */
  function nameProblem(name) {
    if (name === '') return 'A name cannot be empty.';
    // The server counts characters (code points), not UTF-16 units.
    const length = [...name].length;
    if (length > limits.max_name_length) {
      return `A name has at most ${limits.max_name_length} characters (this one has ${length}).`;
    }
    if (NAME_FORBIDDEN.test(name)) return 'A name cannot contain control or formatting characters.';
    return null;
  }

  /** The name from the page's own ?name=, else the remembered one, else null. */
  function initialName() {
    const fromUrl = new URLSearchParams(location.search).get('name');
    const candidate = (fromUrl !== null ? fromUrl : loadStored(STORED_NAME) || '').trim();
    return candidate !== '' && nameProblem(candidate) === null ? candidate : null;
  }

  // ------------------------------------------------------------- rooms

  function makeRoom(name) {
    const item = el('li', 'room');
    item.dataset.room = name;
    const select = el('button', 'room-select');
    select.type = 'button';
    select.append(el('span', 'room-hash', '#'), el('span', 'room-label', name));
    const badge = el('span', 'badge');
    badge.hidden = true;
    select.append(badge);
    item.append(select);
    if (name !== LOBBY) {
      const leave = el('button', 'room-leave', '×');
      leave.type = 'button';
      leave.title = `Leave #${name}`;
      leave.setAttribute('aria-label', `Leave #${name}`);
      item.append(leave);
    }
    return {
      name,
      item,
      badge,
      /** 'joining' until the server confirms (welcome or presence), then 'joined'. */
      state: 'joining',
      /** The log's entries, oldest first; shown in #messages when selected. */
      entries: [],
      /** Member id -> name (or null), of those listed so far. */
      members: new Map(),
      /** How many members the room has, listed or not. */
      count: 0,
      /** The cursor of the next page of members, or null: all are listed. */
      next: null,
      unread: 0,
      /**
       * {epoch, seq} up to which this room's log is complete: the last
       * message seen, or where the room stood when joined.  The "since" of
       * the next rejoin.
       */
      cursor: null,
      /** {epoch, seq} of the latest message seen, gaps or not. */
      latest: null,
      /** {epoch, seq} the server said the room stood at when we (re)joined it. */
      joinPoint: null,
      /** Whether a replay was asked for and its "recovered" has not come yet. */
      recovering: false,
      /** The entry after which a replay's "may be missing" notice belongs. */
      recoveryMark: null,
      /** Keys "epoch:seq" of recent messages, to drop one that comes twice. */
      seen: new Set(),
      /** The user asked for this room on this page: say so once joined. */
      announceJoin: false,
      scrollTop: 0,
      follow: true,
    };
  }

  function addRoom(name) {
    const room = makeRoom(name);
    rooms.set(name, room);
    roomsEl.append(room.item);
    updateRoomItem(room);
    return room;
  }

  function rememberRooms() {
    store(STORED_ROOMS, JSON.stringify([...rooms.keys()].filter((name) => name !== LOBBY)));
  }

  function loadRooms() {
    let names = [];
    try {
      names = JSON.parse(loadStored(STORED_ROOMS) || '[]');
    } catch (e) {
      names = [];
    }
    if (!Array.isArray(names)) return;
    for (const name of names) {
      if (typeof name !== 'string' || name === LOBBY || rooms.has(name)) continue;
      if (roomProblem(name) !== null) continue;
      if (rooms.size >= DEFAULT_LIMITS.max_rooms_per_client) break;
      addRoom(name);
    }
  }

  function updateRoomItem(room) {
    const active = room.name === activeRoom;
    room.item.classList.toggle('active', active);
    room.item.dataset.state = room.state;
    const select = room.item.firstElementChild;
    if (active) {
      select.setAttribute('aria-current', 'true');
    } else {
      select.removeAttribute('aria-current');
    }
    room.badge.hidden = room.unread === 0;
    room.badge.textContent = room.unread > 99 ? '99+' : String(room.unread);
    select.setAttribute('aria-label', room.unread
      ? `#${room.name}, ${room.unread} unread` : `#${room.name}`);
  }

  function updateTitle() {
    let unread = 0;
    for (const room of rooms.values()) unread += room.unread;
    document.title = unread ? `(${unread}) ${baseTitle}` : baseTitle;
  }

  /** Show `name`'s log and members, and send from now on to it. */
  function selectRoom(name) {
    const room = rooms.get(name);
    if (!room) return;
    const previous = rooms.get(activeRoom);
    if (previous && previous !== room) {
      previous.scrollTop = messagesEl.scrollTop;
      previous.follow = atBottom();
    }
    activeRoom = name;
    room.unread = 0;
    for (const each of rooms.values()) updateRoomItem(each);
    updateTitle();
    messagesEl.replaceChildren(...room.entries);
    if (room.follow) {
      scrollToBottom();
    } else {
      messagesEl.scrollTop = room.scrollTop;
    }
    roomTitleEl.textContent = `#${name}`;
    textEl.placeholder = `Message #${name}`;
    composeErrorEl.textContent = '';
    renderMembers();
  }

  /** Join a room the user asked for (or switch to it, if already there). */
  function joinRoom(name) {
    if (rooms.has(name)) {
      selectRoom(name);
      return null;
    }
    if (rooms.size >= limits.max_rooms_per_client) {
      return `You can be in at most ${limits.max_rooms_per_client} rooms, the lobby included.`;
    }
    const room = addRoom(name);
    room.announceJoin = true;
    rememberRooms();
    selectRoom(name);
    if (connected()) sendJoin(room);
    return null;
  }

  /** Ask to be in `room`, recovering what was missed there if we were before. */
  function sendJoin(room) {
    const ref = nextRef('j');
    const request = { type: 'join', room: room.name, ref };
    room.state = 'joining';
    room.joinPoint = null;
    if (room.cursor) {
      request.since = { epoch: room.cursor.epoch, seq: room.cursor.seq };
      startRecovery(room);
    }
    requests.set(ref, { kind: 'join', room: room.name });
    updateRoomItem(room);
    send(request);
  }

  function leaveRoom(name) {
    const room = rooms.get(name);
    if (!room || name === LOBBY) return;
    // The server does not tell a member of its own leave: nothing to wait for.
    if (connected()) send({ type: 'leave', room: name });
    for (const [ref, message] of pending) {
      if (message.room === name) pending.delete(ref);
    }
    rooms.delete(name);
    room.item.remove();
    rememberRooms();
    if (activeRoom === name) {
      selectRoom(LOBBY);
    } else {
      updateTitle();
    }
  }

  // -------------------------------------------------------------- the logs

  /** Whether the log is scrolled (nearly) to the bottom. */
  function atBottom() {
    return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 40;
  }

  function scrollToBottom() {
    messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  /**
   * Append an entry to a room's log.  In the room on view, follows new
   * entries only if the reader was already at the bottom, so scrolling back
   * to read is not interrupted; elsewhere, counts it as unread if asked.
   *
   * @returns {boolean} whether the view is following new entries.
   */
  function append(room, entry, options) {
    return insertAt(room, room.entries.length, entry, options);
  }

  /** Put `entry` at `index` in a room's log; see append. */
  function insertAt(room, index, entry, { unread = false } = {}) {
    const active = room.name === activeRoom;
    const follow = active && atBottom();
    room.entries.splice(index, 0, entry);
    if (active) {
      const next = room.entries[index + 1];
      if (next) {
        messagesEl.insertBefore(entry, next);
      } else {
        messagesEl.append(entry);
      }
    }
    while (room.entries.length > MAX_ENTRIES) room.entries.shift().remove();
    if (active) {
      if (follow) scrollToBottom();
    } else if (unread) {
      room.unread += 1;
      updateRoomItem(room);
      updateTitle();
    }
    return follow;
  }

  /** Put `entry` right after `after` in a room's log (at its start if gone). */
  function insertAfter(room, after, entry) {
    const index = after === null ? -1 : room.entries.indexOf(after);
    insertAt(room, index + 1, entry);
  }

  /** Where each message entry stands in its room's sequence: {epoch, seq}. */
  const positions = new WeakMap();

  /**
   * Add a message entry to a room's log in sequence order.  Messages come
   * in order, except that a live one may overtake replayed older ones
   * (the server says so of networked backplanes): it then goes before the
   * later messages of the same epoch, not after them.
   */
  function placeMessage(room, entry, position, options) {
    let index = room.entries.length;
    if (position) {
      for (let i = room.entries.length - 1; i >= 0; i -= 1) {
        const at = positions.get(room.entries[i]);
        if (!at) continue;
        if (at.epoch !== position.epoch || at.seq < position.seq) break;
        index = i;
      }
      positions.set(entry, position);
    }
    return insertAt(room, index, entry, options);
  }

  function noticeEntry(text, kind) {
    const entry = el('li', `entry notice ${kind}`);
    entry.append(timeEl(Date.now() / 1000), el('span', 'text', text));
    return entry;
  }

  /** A one-line notice in one room's log: joins, leaves, errors. */
  function notice(room, text, kind = 'info') {
    if (room) append(room, noticeEntry(text, kind));
  }

  /** A notice in every room's log: connection news concerns them all. */
  function noticeEverywhere(text, kind) {
    for (const room of rooms.values()) notice(room, text, kind);
  }

  /** The start of a message-like entry: who sent it, when, and whether it was us. */
  function senderEntry(className, from, name, ts) {
    const mine = myIds.has(from);
    const entry = el('li', `entry ${className}${mine ? ' mine' : ''}`);
    entry.dataset.from = from;
    const meta = el('div', 'meta');
    const who = el('span', `from ${colourClass(from)}`, label(from, name));
    who.title = from;
    meta.append(who);
    if (mine) meta.append(el('span', 'you', 'you'));
    meta.append(timeEl(ts));
    entry.append(meta);
    return entry;
  }

  /**
   * Remember that a message was shown.
   *
   * @returns {object|null|false} its {epoch, seq}; null if it has none;
   *     false if it was shown before.
   */
  function firstSighting(room, event) {
    if (typeof event.epoch !== 'string' || !Number.isInteger(event.seq)) return null;
    const position = { epoch: event.epoch, seq: event.seq };
    const key = `${position.epoch}:${position.seq}`;
    if (room.seen.has(key)) return false;
    room.seen.add(key);
    if (room.seen.size > 2 * MAX_ENTRIES) {
      room.seen.delete(room.seen.values().next().value);
    }
    room.latest = later(room.latest, position);
    // During a replay the log may have a gap until "recovered": a cursor
    // moved past it would make the next rejoin skip what is in it.
    if (!room.recovering) advanceCursor(room, position);
    return position;
  }

  function showMessage(event) {
    const room = rooms.get(String(event.room || LOBBY));
    // A room we left a moment ago: the server has not heard yet.
    if (!room) return;
    const position = firstSighting(room, event);
    if (position === false) {
      console.debug('broadcaster: dropping a message seen before', event.room, event.seq);
      return;
    }
    const from = String(event.from);
    const mine = myIds.has(from);
    if (mine) settleEcho(room, event.text);
    const entry = senderEntry('message', from, event.name, event.ts);
    entry.append(el('p', 'text', event.text));
    const follow = placeMessage(room, entry, position, { unread: !mine });
    // The user's own message always brings the view down to it.
    if (mine && room.name === activeRoom && !follow) scrollToBottom();
  }

  /** The room a binary message belongs to: its header's, the lobby if none. */
  function binaryRoom(header) {
    return rooms.get(header && header.room ? String(header.room) : LOBBY);
  }

  /**
   * Show an image event's picture.  Only these bytes ever reach the
   * browser's image decoders: the server has decoded them with Pillow and
   * encoded them afresh as a PNG of the stated size, so whatever the sender
   * crafted went no further than the server.
   */
  function showImage(header, buffer) {
    const room = binaryRoom(header);
    if (!room) return;
    const from = String(header.from);
    const who = label(from, knownName(from));
    const entry = senderEntry('image', from, knownName(from), header.ts);
    const dims = Number.isInteger(header.width) && Number.isInteger(header.height)
      ? ` (${header.width}×${header.height})` : '';
    entry.append(el('p', 'text', `${who} sent an image${dims}`));
    const url = URL.createObjectURL(new Blob([buffer], { type: 'image/png' }));
    const img = el('img', 'picture');
    img.alt = `image from ${who}`;
    entry.append(img);
    const follow = append(room, entry, { unread: !myIds.has(from) });
    img.addEventListener('load', () => {
      // Once decoded, the picture no longer needs its Blob.
      URL.revokeObjectURL(url);
      // It is taller now than when appended: stay at the bottom.
      if (follow && room.name === activeRoom) scrollToBottom();
    }, { once: true });
    img.addEventListener('error', () => {
      URL.revokeObjectURL(url);
      img.remove();
    }, { once: true });
    img.src = url;
  }

  /**
   * A button that saves `bytes` as a file.  They are a stranger's and
   * unchecked, so they are never shown: the Blob is typed
   * application/octet-stream, the file named .bin (a viewer would pick a
   * decoder by its extension), and the object URL made on a click only and
   * revoked soon after, so that a log of binary messages pins no URLs.
   */
  function downloadButton(bytes, from) {
    const button = el('button', 'download', 'Download');
    button.type = 'button';
    button.addEventListener('click', () => {
      const url = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
      const link = el('a');
      link.href = url;
      link.download = `binary-from-${from.replace(/[^A-Za-z0-9_.-]/g, '_')}.bin`;
      link.click();
      // Revoking at once could cancel a download that has not started.
      setTimeout(() => URL.revokeObjectURL(url), DOWNLOAD_URL_LIFETIME_MS);
    });
    return button;
  }

  /**
   * Show a binary message from a client: who sent how many bytes, and a
   * button to save them.  Never a picture, whatever the bytes look like:
   * only the server's re-encoded images (showImage) are decoded here.
   * `header` is the "binary" event announcing the bytes, or null if they
   * arrived unannounced.
   */
  function showBinary(header, buffer) {
    const room = binaryRoom(header);
    if (!room) return;
    const bytes = new Uint8Array(buffer);
    const from = header ? String(header.from) : '?';
    const who = label(from, knownName(from));
    const entry = senderEntry('binary', from, knownName(from), header ? header.ts : null);
    const size = `${bytes.length} byte${bytes.length === 1 ? '' : 's'}`;
    entry.append(el('p', 'text', `${who} sent binary, ${size}`), downloadButton(bytes, from));
    append(room, entry, { unread: !myIds.has(from) });
  }

  // ------------------------------------------------------ own messages

  function pendingEntry(text) {
    const entry = el('li', 'entry outgoing mine pending');
    if (myId !== null) entry.dataset.from = myId;
    const meta = el('div', 'meta');
    meta.append(el('span', 'from', label(myId, myName)), el('span', 'state', 'sending…'));
    entry.append(meta, el('p', 'text', text));
    return entry;
  }

  /** Send `text` to `roomName`, shown as pending until its echo comes back. */
  function sendMessage(roomName, text) {
    const ref = nextRef('m');
    const request = JSON.stringify({ type: 'message', room: roomName, text, ref });
    // A message over the limit would make the server close the connection.
    const size = new TextEncoder().encode(request).length;
    if (size > limits.max_message_size) {
      return `Too long to send: ${size} bytes, and the server takes at most ` +
        `${limits.max_message_size}.`;
    }
    socket.send(request);
    const room = rooms.get(roomName);
    const entry = pendingEntry(text);
    pending.set(ref, { room: roomName, text, entry, connection: connectionNumber });
    append(room, entry);
    if (roomName === activeRoom) scrollToBottom();
    return null;
  }

  /**
   * Our message came back from the server: it replaces the oldest pending
   * one with the same text in that room (the server numbers a sender's
   * messages in the order sent).
   */
  function settleEcho(room, text) {
    for (const [ref, message] of pending) {
      if (message.room === room.name && message.text === text) {
        forgetEntry(room, message.entry);
        pending.delete(ref);
        return;
      }
    }
  }

  function forgetEntry(room, entry) {
    const index = room.entries.indexOf(entry);
    if (index >= 0) room.entries.splice(index, 1);
    entry.remove();
  }

  /** Mark a pending message failed, saying why, with a way to send it again. */
  function failPending(ref, reason) {
    const message = pending.get(ref);
    if (!message) return;
    pending.delete(ref);
    const { entry } = message;
    entry.classList.remove('pending');
    entry.classList.add('failed');
    const state = entry.querySelector('.state');
    state.textContent = `not sent: ${reason}`;
    const retry = el('button', 'retry', 'Retry');
    retry.type = 'button';
    retry.addEventListener('click', () => {
      const room = rooms.get(message.room);
      if (!room || !connected()) return;
      forgetEntry(room, entry);
      sendMessage(message.room, message.text);
    });
    entry.querySelector('.meta').append(retry);
  }

  /**
   * After a reconnect, a message sent on an older connection whose echo
   * neither came before the drop nor in the room's replay never reached
   * the server.
   */
  function failLostMessages(roomName) {
    for (const [ref, message] of pending) {
      if (message.room === roomName && message.connection < connectionNumber) {
        failPending(ref, 'the connection was lost');
      }
    }
  }

  // ------------------------------------------------------------ recovery

  /** The later of two positions; one of a new epoch wins. */
  function later(current, point) {
    if (!current || current.epoch !== point.epoch || point.seq > current.seq) {
      return { epoch: point.epoch, seq: point.seq };
    }
    return current;
  }

  /** Move a room's cursor forward (or onto a new epoch). */
  function advanceCursor(room, point) {
    room.cursor = later(room.cursor, point);
  }

  /** A replay was asked for: messages that come before "recovered" belong to it. */
  function startRecovery(room) {
    room.recovering = true;
    room.recoveryMark = room.entries.length ? room.entries[room.entries.length - 1] : null;
  }

  /** The server said where a room stands as we (re)joined it (welcome or presence). */
  function joinedAt(room, epoch, seq) {
    if (typeof epoch !== 'string' || !Number.isInteger(seq)) return;
    room.joinPoint = { epoch, seq };
    // During a replay "recovered" moves the cursor.
    if (!room.recovering) advanceCursor(room, room.joinPoint);
  }

  function recovered(room, complete) {
    room.recovering = false;
    // Everything we missed has now been replayed, or is lost for good.  If
    // the sequence restarted meanwhile, what came before the rejoin in the
    // new epoch was replayed too (or lost): start from there.
    const point = room.joinPoint;
    if (point && (!room.cursor || room.cursor.epoch !== point.epoch)) {
      room.cursor = { epoch: point.epoch, seq: point.seq };
    }
    if (room.latest && room.cursor && room.latest.epoch === room.cursor.epoch) {
      advanceCursor(room, room.latest);
    }
    failLostMessages(room.name);
    if (!complete) {
      insertAfter(room, room.recoveryMark, noticeEntry(
        `Some messages in #${room.name} may be missing ` +
        '(the server could not replay them all).', 'warning missing'));
    }
    room.recoveryMark = null;
  }

  // ---------------------------------------------------------- the members

  function renderMembers() {
    const room = rooms.get(activeRoom);
    peopleTitleEl.textContent = `#${activeRoom}`;
    membersEl.replaceChildren(...[...room.members].map(([id, name]) => {
      const me = id === myKey;
      const item = el('li', me ? 'member me' : 'member');
      item.dataset.id = id;
      item.title = id;
      item.append(el('span', `dot ${colourClass(id)}`), el('span', 'name', label(id, name)));
      if (me) item.append(el('span', 'you', 'you'));
      return item;
    }));
    memberCountEl.textContent = String(Math.max(room.count, room.members.size));
    moreMembersEl.hidden = room.next === null || !connected();
    // Until the server confirms the room, its list is only who was here last.
    membersEl.classList.toggle('stale', !connected() || room.state !== 'joined');
  }

  function membersChanged(room) {
    if (room.name === activeRoom) renderMembers();
  }

  /** The server's member count, or the list's length if it sent none. */
  function memberCount(event, map) {
    return Number.isInteger(event.count) && event.count >= map.size ? event.count : map.size;
  }

  function pageCursor(value) {
    return typeof value === 'string' ? value : null;
  }

  moreMembersEl.addEventListener('click', () => {
    const room = rooms.get(activeRoom);
    if (!room || room.next === null || !connected()) return;
    send({ type: 'who', room: room.name, cursor: room.next });
    moreMembersEl.hidden = true;
  });

  function memberMap(list) {
    const map = new Map();
    for (const member of Array.isArray(list) ? list : []) {
      const key = member ? memberKey(member) : null;
      if (key !== null) {
        map.set(key, typeof member.name === 'string' ? member.name : null);
      }
    }
    return map;
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
    const isConnected = state === 'connected';
    if (!isConnected && document.activeElement === textEl) hadFocus = true;
    textEl.disabled = !isConnected;
    sendEl.disabled = !isConnected;
    if (isConnected && hadFocus) {
      hadFocus = false;
      textEl.focus();
    }
    renderMembers();
  }

  function connectedText() {
    return `Connected as ${label(myId, myName)}`;
  }

  // -------------------------------------------------------- the protocol

  function onWelcome(event) {
    connectionNumber += 1;
    myId = String(event.id);
    myKey = event.user != null ? USER_KEY + String(event.user) : myId;
    myIds.add(myId);
    myName = typeof event.name === 'string' ? event.name : null;
    limits = { ...DEFAULT_LIMITS, ...(event.limits || {}) };
    requests.clear();

    const who = myName ? `${myName} (${myId})` : myId;
    noticeEverywhere(everConnected ? `Reconnected as ${who}` : `Connected as ${who}`, 'ok');
    everConnected = true;

    const lobby = rooms.get(LOBBY);
    // A new connection's welcome is the whole truth: forget the old list.
    lobby.members = memberMap(event.members);
    lobby.count = memberCount(event, lobby.members);
    lobby.next = pageCursor(event.next);
    if (!lobby.members.has(myKey)) lobby.members.set(myKey, myName);
    lobby.state = 'joined';
    lobby.joinPoint = null;
    if (lobbySinceSent) startRecovery(lobby);
    joinedAt(lobby, event.epoch, event.seq);
    updateRoomItem(lobby);
    for (const room of rooms.values()) {
      if (room.name !== LOBBY) sendJoin(room);
    }
    // Messages sent on the old connection to rooms that get no replay.
    for (const [ref, message] of pending) {
      const room = rooms.get(message.room);
      if (message.connection < connectionNumber && !(room && room.recovering)) {
        failPending(ref, 'the connection was lost');
      }
    }
    if (wantedName !== null && wantedName !== myName) sendHello(wantedName);
    if (myName !== null && wantedName === null) wantedName = myName;
    if (document.activeElement !== displayNameEl) displayNameEl.value = wantedName || '';
    setStatus('connected', connectedText());
  }

  function onJoin(event) {
    const room = rooms.get(String(event.room));
    if (!room) return;
    const id = memberKey(event);
    if (id === null) return;
    const name = typeof event.name === 'string' ? event.name : null;
    if (!room.members.has(id)) room.count += 1;
    room.members.set(id, name);
    membersChanged(room);
    // Our own joins: the welcome and the room's presence tell of them.
    if (id !== myKey) notice(room, `${label(id, name)} joined`);
  }

  function onLeave(event) {
    const room = rooms.get(String(event.room));
    if (!room) return;
    const id = memberKey(event);
    if (id === null) return;
    const name = room.members.get(id) || (typeof event.name === 'string' ? event.name : null);
    room.members.delete(id);
    room.count = Math.max(0, room.count - 1);
    membersChanged(room);
    notice(room, `${label(id, name)} left`);
  }

  function onRename(event) {
    const room = rooms.get(String(event.room));
    if (!room || typeof event.name !== 'string') return;
    const id = memberKey(event);
    if (id === null) return;
    const before = room.members.has(id) ? room.members.get(id) : null;
    room.members.set(id, event.name);
    membersChanged(room);
    if (String(event.id) === myId) {
      myName = event.name;
      wantedName = event.name;
      store(STORED_NAME, event.name);
      nameErrorEl.textContent = '';
      if (document.activeElement !== displayNameEl) displayNameEl.value = event.name;
      setStatus('connected', connectedText());
      notice(room, `You are now ${event.name}`);
    } else if (before !== event.name) {
      notice(room, `${label(id, before)} is now ${event.name}`);
    }
  }

  function onPresence(event) {
    const room = rooms.get(String(event.room));
    if (!room) return;
    if (pageCursor(event.cursor) !== null) {
      // A further page of members, asked for with "Show more".
      for (const [id, name] of memberMap(event.members)) room.members.set(id, name);
      room.count = memberCount(event, room.members);
      room.next = pageCursor(event.next);
      membersChanged(room);
      return;
    }
    room.members = memberMap(event.members);
    room.count = memberCount(event, room.members);
    room.next = pageCursor(event.next);
    if (myKey !== null && !room.members.has(myKey)) {
      room.members.set(myKey, myName);
      room.count = Math.max(room.count, room.members.size);
    }
    room.state = 'joined';
    joinedAt(room, event.epoch, event.seq);
    for (const [ref, request] of requests) {
      if (request.kind === 'join' && request.room === room.name) requests.delete(ref);
    }
    updateRoomItem(room);
    membersChanged(room);
    if (room.announceJoin) {
      room.announceJoin = false;
      notice(room, `You joined #${room.name}`);
    }
  }

  function onRecovered(event) {
    const room = rooms.get(String(event.room));
    if (room) recovered(room, event.complete === true);
  }

  function onAck(event) {
    const message = pending.get(event.ref);
    if (!message) return;
    // The echo comes before the ack; if it did not settle this one (it
    // always should), the ack still proves it was sent.
    pending.delete(event.ref);
    const room = rooms.get(message.room);
    if (room) forgetEntry(room, message.entry);
  }

  function onError(event) {
    const reason = String(event.reason);
    const ref = event.ref;
    if (ref != null && pending.has(ref)) {
      failPending(ref, reason);
      return;
    }
    const request = ref != null ? requests.get(ref) : undefined;
    if (request) requests.delete(ref);
    if (request && request.kind === 'join') {
      const room = rooms.get(request.room);
      roomErrorEl.textContent = `Could not join #${request.room}: ${reason}`;
      if (room) leaveRoom(room.name);
      return;
    }
    if (request && request.kind === 'hello') {
      nameErrorEl.textContent = reason;
      // Do not offer this name again on the next connection.
      wantedName = myName;
      if (loadStored(STORED_NAME) === request.name) store(STORED_NAME, myName);
      return;
    }
    notice(rooms.get(activeRoom), `Server error: ${reason}`, 'error');
  }

  function handleEvent(event) {
    switch (event.type) {
      case 'welcome': onWelcome(event); break;
      case 'join': onJoin(event); break;
      case 'leave': onLeave(event); break;
      case 'rename': onRename(event); break;
      case 'presence': onPresence(event); break;
      case 'message': showMessage(event); break;
      case 'recovered': onRecovered(event); break;
      case 'ack': onAck(event); break;
      case 'error': onError(event); break;
      case 'expiring':
        noticeEverywhere(
          `Your sign-in ends in ${Math.round(event.in)} s: open the page again with a new token.`,
          'connection');
        break;
      case 'binary':
      case 'image':
        // The bytes follow as the next binary message.
        pendingBinary = event;
        break;
      default:
        // A newer server may send more; ignore what we do not understand.
        console.debug('broadcaster: ignoring event of type', event.type);
    }
  }

  function onMessage(message) {
    if (message.data instanceof ArrayBuffer) {
      if (pendingBinary && pendingBinary.type === 'image') {
        showImage(pendingBinary, message.data);
      } else {
        showBinary(pendingBinary, message.data);
      }
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

  function sendHello(name) {
    const ref = nextRef('h');
    requests.set(ref, { kind: 'hello', name });
    send({ type: 'hello', name, ref });
  }

  // ------------------------------------------------ connect and reconnect

  /**
   * A sign-in token given in the page's fragment (#token=...): fragments
   * never reach a server, nor a Referer.  It is kept for this tab only
   * (sessionStorage, so that a reload keeps it) and taken out of the
   * address bar, and sent as ?token= on the WebSocket handshake, the one
   * place a browser can put it.
   */
  const signInToken = (() => {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const given = fragment.get('token');
    if (given) {
      fragment.delete('token');
      const rest = fragment.toString();
      history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : ''));
      try { sessionStorage.setItem('broadcaster.token', given); } catch (e) { /* private mode */ }
      return given;
    }
    try { return sessionStorage.getItem('broadcaster.token'); } catch (e) { return null; }
  })();

  /**
   * The WebSocket URL: this page's host and query, with our name and the
   * lobby's cursor (so the server replays what we missed there).
   */
  function socketUrl() {
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    const params = new URLSearchParams(location.search);
    params.delete('name');
    params.delete('since');
    if (signInToken) params.set('token', signInToken);
    const query = [];
    for (const [key, value] of params) {
      query.push(`${encodeURIComponent(key)}=${encodeURIComponent(value)}`);
    }
    // A name the server refuses fails the handshake, and the page cannot
    // see why: after a failed attempt with it, try without it (and send
    // it with hello, which answers with the reason).
    if (wantedName !== null && failedAttempts % 2 === 0) {
      query.push(`name=${encodeURIComponent(wantedName)}`);
    }
    const lobbyCursor = rooms.get(LOBBY).cursor;
    lobbySinceSent = lobbyCursor !== null;
    if (lobbySinceSent) {
      query.push(`since=${encodeURIComponent(lobbyCursor.epoch)}:${lobbyCursor.seq}`);
    }
    return `${scheme}${location.host}/${query.length ? `?${query.join('&')}` : ''}`;
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
      onDisconnect({ code: 0, reason: String(e) }, false);
      return;
    }
    ws.binaryType = 'arraybuffer';
    socket = ws;
    pendingBinary = null;
    let opened = false;

    // Every handler checks it still belongs to the current socket: a late
    // event from a replaced one must not touch the page.
    ws.addEventListener('open', () => {
      if (ws !== socket) return;
      opened = true;
      failedAttempts = 0;
      // The server accepted us: the next drop starts the backoff afresh.
      backoffMs = BACKOFF_MIN_MS;
    });
    ws.addEventListener('message', (message) => {
      if (ws === socket) onMessage(message);
    });
    ws.addEventListener('close', (close) => {
      if (ws !== socket) return;
      socket = null;
      onDisconnect(close, opened);
    });
    // An 'error' is always followed by 'close', which does the work.
  }

  function onDisconnect(close, opened) {
    const wasConnected = myId !== null;
    if (!opened) failedAttempts += 1;
    myId = null;
    pendingBinary = null;
    requests.clear();
    for (const room of rooms.values()) {
      room.state = 'joining';
      updateRoomItem(room);
    }
    const delayMs = scheduleReconnect();
    const retry = `reconnecting in ${(delayMs / 1000).toFixed(1)} s`;
    // Say so in the logs once per outage; the header counts down each retry.
    if (wasConnected) {
      const why = close.reason ? `: ${close.reason}` : '';
      noticeEverywhere(`Disconnected (code ${close.code}${why}); ${retry}…`, 'connection');
    } else if (!everConnected && !toldUnreachable) {
      toldUnreachable = true;
      noticeEverywhere(`Cannot reach the server; ${retry}…`, 'connection');
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

  // ------------------------------------------------------------- the forms

  composeEl.addEventListener('submit', (submit) => {
    submit.preventDefault();
    const text = textEl.value;
    if (text.trim() === '' || !connected()) return;
    const problem = sendMessage(activeRoom, text);
    composeErrorEl.textContent = problem || '';
    if (problem) return;
    textEl.value = '';
    textEl.focus();
  });

  textEl.addEventListener('input', () => {
    composeErrorEl.textContent = '';
  });

  joinFormEl.addEventListener('submit', (submit) => {
    submit.preventDefault();
    const name = roomNameEl.value.trim();
    const problem = roomProblem(name) || joinRoom(name);
    roomErrorEl.textContent = problem || '';
    roomNameEl.setAttribute('aria-invalid', problem ? 'true' : 'false');
    if (problem) {
      roomNameEl.focus();
      return;
    }
    roomNameEl.value = '';
    if (!textEl.disabled) textEl.focus();
  });

  roomNameEl.addEventListener('input', () => {
    roomErrorEl.textContent = '';
    roomNameEl.removeAttribute('aria-invalid');
  });

  roomsEl.addEventListener('click', (click) => {
    const button = click.target.closest('button');
    const item = button && button.closest('li[data-room]');
    if (!item) return;
    if (button.classList.contains('room-leave')) {
      leaveRoom(item.dataset.room);
    } else {
      selectRoom(item.dataset.room);
    }
  });

  nameFormEl.addEventListener('submit', (submit) => {
    submit.preventDefault();
    const name = displayNameEl.value.trim();
    const problem = nameProblem(name);
    nameErrorEl.textContent = problem || '';
    displayNameEl.setAttribute('aria-invalid', problem ? 'true' : 'false');
    if (problem) return;
    displayNameEl.value = name;
    if (connected() && name === myName) return;
    if (connected()) {
      // Remembered once the server confirms it (its rename event).
      sendHello(name);
    } else {
      // Offline: used in ?name= when the page connects.
      wantedName = name;
      store(STORED_NAME, name);
    }
  });

  displayNameEl.addEventListener('input', () => {
    nameErrorEl.textContent = '';
    displayNameEl.removeAttribute('aria-invalid');
  });

  // ---------------------------------------------------------------- start

  addRoom(LOBBY);
  loadRooms();
  selectRoom(LOBBY);
  displayNameEl.value = wantedName || '';
  connect();
})();
