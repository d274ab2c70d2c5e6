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
 *                    ack {ref, room, image}                 an image of ours was shared
 *                    history {room, messages, more}         earlier messages, oldest first
 *                    recovered {room, complete}             a replay is over
 *                    error {reason, ref?}
 *   page -> server   message {room, text, ref}, join {room, since?, ref},
 *                    leave {room}, hello {name, ref}, who {room, cursor},
 *                    history {room, limit, before?, ref}
 *                    image {size, room, ref}
 *                        followed at once by one binary message: the image
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
 * History.  The first time the page is in a room (the lobby from the
 * welcome, another room from its presence), it asks for the room's last
 * HISTORY_PAGE messages and shows them above a divider, "New since you
 * arrived", placed where the room stood when the page joined it: what is
 * below came live.  Scrolling to the top of the log, or the "Load earlier
 * messages" button there, asks for the page before (history with before,
 * the oldest seq shown) while the server says more are kept.  The server's
 * reply carries no ref: replies come in the order asked, so the page
 * queues what it asked per room.  A reconnect asks no history again:
 * recovery fills the gap instead.  A live message may come before the
 * history that holds it, and a replay may hold what history does too:
 * every message is shown once, deduplicated by its room, epoch and seq.
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
 * Sharing pictures.  The Image button (a file chooser), pasting, or
 * dropping files on the conversation shares images in the room on view.
 * Each file is checked first, against the welcome's max_image_size and
 * for an image/* type, so that one the server would refuse is refused at
 * once without a byte sent.  One image is under way at a time; the others
 * chosen with it wait their turn (at most MAX_WAITING_UPLOADS).  Its bytes
 * are read, then announced (image, with their size) and sent in the same
 * task, so that no other message can come between the two.  While they
 * leave the page, socket.bufferedAmount says how many have not: the
 * status under the message box shows the rest as sent.  The server then
 * checks and re-encodes the image and shares it, the sender included,
 * like any other image event, and answers with an ack ("Shared") or an
 * error whose reason starts "image: ", shown under the message box.  A
 * dropped connection fails the image under way and those waiting.
 *
 * Unread.  Messages from others in a room not on view count in its badge
 * and in the tab's title, "(3) broadcaster"; showing the room clears them.
 * History never counts, and neither do our own messages.
 *
 * Small screens.  Below SMALL_SCREEN the rooms, people and name panels
 * are hidden behind a toggle in the header (which shows the unread total),
 * and open over the log; choosing a room or pressing Escape closes them.
 *
 * Keyboard.  Every control is a button or a form field, in document order:
 * the rooms, the join box, the people, the name, the log (which scrolls
 * with the arrow keys), the Image button, the message box.  In the room
 * list the arrow keys, Home and End move between rooms; anywhere,
 * Alt+ArrowUp and Alt+ArrowDown show the previous and next room.
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
  // open for days does not grow without bound.  Scrolling back stops there.
  const MAX_ENTRIES = 1000;

  // Messages asked for on first joining a room, and at each step back:
  // more than a tall screen holds, in one small reply.  docs/using.rst
  // gives the number.
  const HISTORY_PAGE = 50;

  // Scrolled this close to the top of the log (px), the page asks for
  // earlier messages, so that they are usually there before the top is.
  const LOAD_OLDER_MARGIN_PX = 200;

  // The width below which the panels fold away: chat.css's phone layout
  // uses the same number.
  const SMALL_SCREEN = window.matchMedia('(max-width: 640px)');

  // Images chosen (or dropped) together wait their turn, at most this many,
  // so that a folder dropped by mistake is not sent whole.
  const MAX_WAITING_UPLOADS = 10;
  // How often the bytes of an image on its way are counted again.
  const UPLOAD_POLL_MS = 100;
  // How long "Shared ..." stays under the message box.
  const UPLOAD_DONE_SHOWN_MS = 10000;

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
    max_image_size: 16 * 1024 * 1024,
  };

  const STORED_NAME = 'broadcaster.name';
  const STORED_ROOMS = 'broadcaster.rooms';

  const statusEl = document.getElementById('status');
  const panelsToggleEl = document.getElementById('panels-toggle');
  const unreadTotalEl = document.getElementById('unread-total');
  const chatEl = document.getElementById('chat');
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
  const imageButtonEl = document.getElementById('image-button');
  const imageFileEl = document.getElementById('image-file');
  const uploadStatusEl = document.getElementById('upload-status');
  const uploadProgressEl = document.getElementById('upload-progress');
  const uploadBytesEl = document.getElementById('upload-bytes');
  const uploadErrorEl = document.getElementById('upload-error');
  const sidebarEl = document.getElementById('sidebar');
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
  /**
   * Other requests awaiting an answer: ref -> {kind: 'join' | 'hello' |
   * 'history' | 'image', ...}.
   */
  const requests = new Map();
  /**
   * History requests awaiting their reply, per room name, in the order
   * sent: a reply names its room, not its request.  Kept by name, so that
   * a reply for a room left (and joined again) meanwhile still finds the
   * request it answers.
   */
  const historyAsked = new Map();
  let refCounter = 0;

  /** Images chosen and not yet under way, oldest first: {file, room}. */
  const uploadQueue = [];
  /**
   * The image under way, or null: {file, room, ref, size, sent, socket,
   * stage: 'reading' | 'sending' | 'checking'}.
   */
  let upload = null;
  /** Counts its bytes while they leave the page (setInterval). */
  let uploadTimer = null;
  /** Takes "Shared ..." away again (setTimeout). */
  let uploadDoneTimer = null;

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
    // The top of the log: how far back it goes, and the way further.
    const marker = el('li', 'entry history-marker');
    marker.hidden = true;
    const olderButton = el('button', 'load-older', 'Load earlier messages');
    olderButton.type = 'button';
    olderButton.hidden = true;
    const markerText = el('span', 'marker-text');
    marker.append(olderButton, markerText);
    return {
      name,
      item,
      badge,
      marker,
      olderButton,
      markerText,
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
      /** Whether the room's recent history has been shown (or cannot be). */
      recent: false,
      /**
       * How far back the log goes: 'unknown' (no history yet), 'more' (the
       * server keeps older messages), 'start' (the conversation's first
       * message is shown), 'full' (MAX_ENTRIES reached), 'gone' (the
       * sequence restarted: what came before is lost), 'unavailable'.
       */
      older: 'unknown',
      /** Why history is unavailable, from the server's error. */
      historyProblem: '',
      /** 'recent' or 'older' while a history request is on its way, else null. */
      historyRequest: null,
      /** {epoch, seq} of the oldest message history gave: the next "before". */
      oldest: null,
      /** {epoch, seq} where the room stood when the page first joined it. */
      arrival: null,
      /** The "new since you arrived" entry, once history has come. */
      divider: null,
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

  /** The tab's title, and the panels toggle of small screens, show the unread total. */
  function updateTitle() {
    let unread = 0;
    for (const room of rooms.values()) unread += room.unread;
    document.title = unread ? `(${unread}) ${baseTitle}` : baseTitle;
    unreadTotalEl.hidden = unread === 0;
    unreadTotalEl.textContent = unread > 99 ? '99+' : String(unread);
    panelsToggleEl.setAttribute('aria-label', unread ? `Rooms, ${unread} unread` : 'Rooms');
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
    messagesEl.replaceChildren(room.marker, ...room.entries);
    if (room.follow) {
      scrollToBottom();
    } else {
      messagesEl.scrollTop = room.scrollTop;
    }
    roomTitleEl.textContent = `#${name}`;
    textEl.placeholder = `Message #${name}`;
    composeErrorEl.textContent = '';
    renderMembers();
    maybeLoadOlder();
  }

  /** Show the room `step` places before or after the one on view (wrapping round). */
  function selectNearbyRoom(step) {
    const names = [...rooms.keys()];
    const index = names.indexOf(activeRoom);
    selectRoom(names[(index + step + names.length) % names.length]);
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
    while (room.entries.length > MAX_ENTRIES) dropOldest(room);
    if (active) {
      if (follow) scrollToBottom();
    } else if (unread) {
      room.unread += 1;
      updateRoomItem(room);
      updateTitle();
    }
    return follow;
  }

  /**
   * Drop the oldest entry of a full log.  The log then no longer reaches
   * back to where history left it: scrolling back stops, and says why.
   */
  function dropOldest(room) {
    const entry = room.entries.shift();
    entry.remove();
    if (entry === room.divider) room.divider = null;
    if (room.older !== 'unavailable' && room.older !== 'full') {
      room.older = 'full';
      renderMarker(room);
    }
  }

  /** Put `entries` at the top of a room's log, below its marker. */
  function prepend(room, entries) {
    if (entries.length === 0) return;
    room.entries.unshift(...entries);
    if (room.name === activeRoom) room.marker.after(...entries);
  }

  /**
   * Run `change`, which adds entries to a room's log or changes its
   * marker, without moving what the reader sees: the first entry that
   * was there keeps its place on screen, or, if the reader was at the
   * bottom, the log stays at the bottom.
   */
  function keepingView(room, change) {
    if (room.name !== activeRoom) {
      change();
      return;
    }
    const follow = atBottom();
    const anchor = room.entries.length ? room.entries[0] : null;
    const top = anchor ? anchor.getBoundingClientRect().top : 0;
    change();
    if (follow || !anchor || !anchor.isConnected) {
      scrollToBottom();
    } else {
      messagesEl.scrollTop += anchor.getBoundingClientRect().top - top;
    }
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
    const position = positionOf(event);
    if (position === null) return null;
    if (!markSeen(room, position)) return false;
    room.latest = later(room.latest, position);
    // During a replay the log may have a gap until "recovered": a cursor
    // moved past it would make the next rejoin skip what is in it.
    if (!room.recovering) advanceCursor(room, position);
    return position;
  }

  /** A message event's {epoch, seq}, or null if it lacks them. */
  function positionOf(event) {
    if (typeof event.epoch !== 'string' || !Number.isInteger(event.seq)) return null;
    return { epoch: event.epoch, seq: event.seq };
  }

  /**
   * Note that the message at `position` is shown in `room`.
   *
   * @returns {boolean} false if it was shown before.
   */
  function markSeen(room, position) {
    const key = `${position.epoch}:${position.seq}`;
    if (room.seen.has(key)) return false;
    room.seen.add(key);
    if (room.seen.size > 2 * MAX_ENTRIES) {
      room.seen.delete(room.seen.values().next().value);
    }
    return true;
  }

  /** The log entry of a text message, live or from history. */
  function messageEntry(event) {
    const entry = senderEntry('message', String(event.from), event.name, event.ts);
    entry.append(el('p', 'text', event.text));
    return entry;
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
    const mine = myIds.has(String(event.from));
    if (mine) settleEcho(room, event.text);
    const entry = messageEntry(event);
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
    // The first time: history's divider goes there.
    if (!room.arrival) room.arrival = room.joinPoint;
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

  // ------------------------------------------------------------- history

  /** Messages per history request: ours, within the server's --history-size. */
  function historyLimit() {
    const size = limits.history_size;
    return Number.isInteger(size) && size >= 0 ? Math.min(HISTORY_PAGE, size) : HISTORY_PAGE;
  }

  /**
   * The page is in `room` now (its welcome or presence said so, with our
   * `rights` there): the first time, ask what was said before we came.
   * After a reconnect the replay fills the gap instead; a room whose
   * history never came (the connection dropped first) asks again.
   */
  function firstHistory(room, rights) {
    if (room.recent || room.historyRequest !== null) return;
    let problem = null;
    if (Array.isArray(rights) && !rights.includes('history')) {
      problem = 'you may not read them';
    } else if (historyLimit() === 0) {
      problem = 'the server keeps none';
    }
    if (problem === null) {
      askHistory(room, 'recent');
      return;
    }
    room.recent = true;
    room.older = 'unavailable';
    room.historyProblem = problem;
    renderMarker(room);
  }

  /** Ask for a room's 'recent' messages, or the 'older' ones before those shown. */
  function askHistory(room, what) {
    const ref = nextRef('y');
    const request = { type: 'history', room: room.name, limit: historyLimit(), ref };
    if (what === 'older') request.before = room.oldest.seq;
    const asked = { kind: 'history', room, what, ref };
    requests.set(ref, asked);
    if (!historyAsked.has(room.name)) historyAsked.set(room.name, []);
    historyAsked.get(room.name).push(asked);
    room.historyRequest = what;
    renderMarker(room);
    send(request);
  }

  /** Ask for the messages before the oldest shown, if the server keeps any. */
  function loadOlder(room) {
    if (room.older !== 'more' || room.historyRequest !== null) return;
    if (!connected() || room.state !== 'joined' || room.oldest === null) return;
    const now = room.joinPoint || room.cursor;
    if (now && now.epoch !== room.oldest.epoch) {
      // The sequence restarted: "before" would mean the new one's messages.
      room.older = 'gone';
      renderMarker(room);
      return;
    }
    askHistory(room, 'older');
  }

  /** At (or near) the top of the log on view: ask for earlier messages. */
  function maybeLoadOlder() {
    if (messagesEl.scrollTop > LOAD_OLDER_MARGIN_PX) return;
    const room = rooms.get(activeRoom);
    if (room) loadOlder(room);
  }

  /** A history request failed: say why at the top of the log, and ask no more. */
  function historyFailed(asked, reason) {
    forgetAsked(asked);
    const { room } = asked;
    if (rooms.get(room.name) !== room) return;
    room.historyRequest = null;
    room.recent = true;
    room.older = 'unavailable';
    room.historyProblem = reason;
    renderMarker(room);
  }

  function forgetAsked(asked) {
    requests.delete(asked.ref);
    const queue = historyAsked.get(asked.room.name) || [];
    const index = queue.indexOf(asked);
    if (index >= 0) queue.splice(index, 1);
    if (queue.length === 0) historyAsked.delete(asked.room.name);
  }

  function onHistory(event) {
    const name = String(event.room);
    const queue = historyAsked.get(name);
    if (!queue) return;
    const asked = queue[0];
    forgetAsked(asked);
    const { room } = asked;
    // Left meanwhile (and if joined again, that room asked afresh).
    if (rooms.get(name) !== room) return;
    room.historyRequest = null;
    const messages = (Array.isArray(event.messages) ? event.messages : [])
      .filter((message) => message && typeof message === 'object');
    const more = event.more === true;
    keepingView(room, () => {
      if (asked.what === 'recent') {
        showRecent(room, messages, more);
      } else {
        showOlder(room, messages, more);
      }
      renderMarker(room);
    });
    if (room.name === activeRoom) maybeLoadOlder();
  }

  /**
   * Turn the messages of a history reply into entries, leaving out those
   * already shown (live, replayed or from an earlier reply).  History
   * does not move the room's cursor: it says nothing of what we missed.
   *
   * @returns {Array} [entry, position] pairs, oldest first.
   */
  function historyEntries(room, messages) {
    const entries = [];
    for (const event of messages) {
      const position = positionOf(event);
      if (position === null || !markSeen(room, position)) continue;
      const entry = messageEntry(event);
      positions.set(entry, position);
      entries.push([entry, position]);
    }
    return entries;
  }

  /** The room's last messages, the first time the page is in it. */
  function showRecent(room, messages, more) {
    room.recent = true;
    const { arrival } = room;
    const earlier = [];
    for (const [entry, position] of historyEntries(room, messages)) {
      if (arrival && position.epoch === arrival.epoch && position.seq > arrival.seq) {
        // Said since we came, and not here yet: a live message overtaken
        // by the reply.  In sequence among the live ones.
        placeMessage(room, entry, position);
      } else {
        earlier.push(entry);
      }
    }
    if (earlier.length || more) {
      room.divider = el('li', 'entry divider');
      room.divider.append(el('span', 'divider-text', 'New since you arrived'));
      earlier.push(room.divider);
    }
    prepend(room, earlier);
    room.oldest = messages.length ? positionOf(messages[0]) : null;
    room.older = more && room.oldest !== null ? 'more' : 'start';
  }

  /** The messages before the oldest shown, asked for with "before". */
  function showOlder(room, messages, more) {
    const first = messages.length ? positionOf(messages[0]) : null;
    if (first !== null && room.oldest !== null && first.epoch !== room.oldest.epoch) {
      // The sequence restarted since: these are not what came before.
      room.older = 'gone';
      return;
    }
    prepend(room, historyEntries(room, messages).map(([entry]) => entry));
    if (first !== null) room.oldest = first;
    if (!more || first === null) {
      room.older = 'start';
    } else {
      room.older = room.entries.length >= MAX_ENTRIES ? 'full' : 'more';
    }
  }

  /**
   * The top of a room's log: a way to earlier messages, or why there is
   * none.  The button stays (disabled) while its request is under way,
   * so that the keyboard's focus stays on it.
   */
  function renderMarker(room) {
    const { marker, olderButton, markerText } = room;
    const loading = room.historyRequest === 'older';
    const button = room.older === 'more' || loading;
    if (!button && document.activeElement === olderButton) {
      messagesEl.focus({ preventScroll: true });
    }
    olderButton.hidden = !button;
    olderButton.textContent = loading ? 'Loading…' : 'Load earlier messages';
    olderButton.setAttribute('aria-disabled', String(loading));
    let text = '';
    if (room.historyRequest === 'recent') {
      text = 'Loading earlier messages…';
    } else if (room.older === 'start') {
      text = 'Beginning of the conversation';
    } else if (room.older === 'full') {
      text = `Earlier messages are not shown: the page keeps ${MAX_ENTRIES} entries per room.`;
    } else if (room.older === 'gone') {
      text = 'Earlier messages are no longer kept.';
    } else if (room.older === 'unavailable') {
      text = `Earlier messages are not available: ${room.historyProblem}.`;
    }
    markerText.textContent = text;
    markerText.hidden = text === '';
    marker.hidden = !button && text === '';
  }

  messagesEl.addEventListener('scroll', maybeLoadOlder, { passive: true });

  messagesEl.addEventListener('click', (click) => {
    if (click.target.closest('.load-older')) loadOlder(rooms.get(activeRoom));
  });

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
    imageButtonEl.disabled = !isConnected;
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
    firstHistory(lobby, event.rights);
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
    firstHistory(room, event.rights);
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
    const request = requests.get(event.ref);
    if (request && request.kind === 'image') {
      finishUpload(request.upload, null);
      return;
    }
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
    if (request && request.kind === 'history') {
      historyFailed(request, reason);
      return;
    }
    if (request && request.kind === 'image') {
      finishUpload(request.upload, reason.replace(/^image: /, ''));
      return;
    }
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
      case 'history': onHistory(event); break;
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
    // The image under way, if any, and then each waiting one.
    if (upload !== null) finishUpload(upload, 'the connection was lost');
    requests.clear();
    // Unanswered history is asked again if still wanted (firstHistory).
    historyAsked.clear();
    for (const room of rooms.values()) {
      room.state = 'joining';
      room.historyRequest = null;
      renderMarker(room);
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
    panelsDone();
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
      panelsDone();
    }
  });

  // Arrow keys, Home and End move between the rooms (Enter shows one), so
  // that a long list need not be tabbed through, leave buttons and all.
  roomsEl.addEventListener('keydown', (key) => {
    if (key.altKey || key.ctrlKey || key.metaKey || key.shiftKey) return;
    const buttons = [...roomsEl.querySelectorAll('.room-select')];
    const item = key.target.closest('li[data-room]');
    const current = item ? buttons.indexOf(item.querySelector('.room-select')) : -1;
    if (current < 0) return;
    let next;
    switch (key.key) {
      case 'ArrowUp': next = current - 1; break;
      case 'ArrowDown': next = current + 1; break;
      case 'Home': next = 0; break;
      case 'End': next = buttons.length - 1; break;
      default: return;
    }
    key.preventDefault();
    buttons[Math.max(0, Math.min(buttons.length - 1, next))].focus();
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

  // ---------------------------------------------------------------- images

  /** A size for people: "812 bytes", "45.3 kB", "2.1 MB". */
  function byteSize(bytes) {
    if (bytes < 1000) return `${bytes} byte${bytes === 1 ? '' : 's'}`;
    if (bytes < 1e6) return `${(bytes / 1e3).toFixed(1)} kB`;
    return `${(bytes / 1e6).toFixed(1)} MB`;
  }

  /** What to call a file: its name, quoted (a pasted image is "image.png"). */
  function fileLabel(file) {
    return file.name ? `"${file.name}"` : 'the image';
  }

  /** Why `file` may not be shared, or null: checked before a byte is sent. */
  function imageProblem(file) {
    const name = fileLabel(file);
    // The server decides which image formats it takes, and says so.
    if (!file.type.startsWith('image/')) return `${name} is not an image.`;
    if (file.size === 0) return `${name} is empty.`;
    const limit = limits.max_image_size;
    if (Number.isInteger(limit) && file.size > limit) {
      let [size, most] = [byteSize(file.size), byteSize(limit)];
      // Rounded alike, they would not show why.
      if (size === most) [size, most] = [`${file.size} bytes`, `${limit} bytes`];
      return `${name} is too large to share: ${size}, and the server takes at most ${most}.`;
    }
    return null;
  }

  /**
   * Share `files` (chosen, pasted or dropped) in the room on view, one
   * after the other.  Those that may not be are refused at once, saying why.
   */
  function shareImages(files) {
    uploadErrorEl.textContent = '';
    const room = rooms.get(activeRoom);
    let problem = null;
    if (!connected()) {
      problem = 'Not connected: images can be shared once the page has reconnected.';
    } else if (room.state !== 'joined') {
      problem = `Not in #${room.name} yet: images can be shared once it is joined.`;
    }
    if (problem !== null) {
      uploadErrorEl.textContent = problem;
      return;
    }
    const problems = [];
    for (const file of files) {
      let refused = imageProblem(file);
      if (refused === null && uploadQueue.length >= MAX_WAITING_UPLOADS) {
        refused = `${fileLabel(file)} was not shared: ` +
          `${MAX_WAITING_UPLOADS} images are already waiting their turn.`;
      }
      if (refused === null) {
        uploadQueue.push({ file, room: room.name });
      } else {
        problems.push(refused);
      }
    }
    uploadErrorEl.textContent = problems.join(' ');
    nextUpload();
  }

  /** Start on the next image waiting, unless one is under way. */
  function nextUpload() {
    while (upload === null && uploadQueue.length) {
      const { file, room } = uploadQueue.shift();
      const problem = uploadRoomProblem(room);
      if (problem === null) {
        startUpload(file, room);
      } else {
        uploadFailed(file, problem);
      }
    }
    renderUpload();
  }

  /** Why an image may not be sent to `roomName` now, or null. */
  function uploadRoomProblem(roomName) {
    if (!connected()) return 'the connection was lost';
    const room = rooms.get(roomName);
    if (!room) return `you left #${roomName}`;
    if (room.state !== 'joined') return `not in #${roomName}`;
    return null;
  }

  function startUpload(file, room) {
    const current = {
      file, room, ref: nextRef('i'), size: file.size, sent: 0, socket: null, stage: 'reading',
    };
    upload = current;
    file.arrayBuffer().then(
      (buffer) => sendUpload(current, buffer),
      () => finishUpload(current, 'the file could not be read'),
    );
  }

  /** The image is read: announce it, and send its bytes right behind. */
  function sendUpload(current, buffer) {
    // Given up meanwhile: the connection dropped.
    if (upload !== current) return;
    current.size = buffer.byteLength;
    const problem = uploadRoomProblem(current.room) || (
      current.size > limits.max_image_size ? 'it is larger than the server takes' : null);
    if (problem !== null) {
      finishUpload(current, problem);
      return;
    }
    current.socket = socket;
    current.stage = 'sending';
    requests.set(current.ref, { kind: 'image', upload: current });
    // In the same task: no other message of ours can come in between, which
    // would make the server give the image up.
    send({ type: 'image', size: current.size, room: current.room, ref: current.ref });
    socket.send(buffer);
    uploadTimer = setInterval(() => countSent(current), UPLOAD_POLL_MS);
    renderUpload();
  }

  /**
   * Count the bytes that have left the page: bufferedAmount is what the
   * socket still holds (ours, and whatever was sent behind them).
   */
  function countSent(current) {
    if (upload !== current) return;
    const waiting = current.socket.bufferedAmount;
    current.sent = Math.max(0, current.size - waiting);
    if (waiting === 0) {
      current.sent = current.size;
      current.stage = 'checking';
      clearInterval(uploadTimer);
      uploadTimer = null;
    }
    renderUpload();
  }

  /**
   * The image under way was shared (`problem` null) or not: say so, and
   * go on with the next.
   */
  function finishUpload(current, problem) {
    if (upload !== current) return;
    upload = null;
    clearInterval(uploadTimer);
    uploadTimer = null;
    requests.delete(current.ref);
    if (problem === null) {
      uploadStatusEl.dataset.state = 'shared';
      uploadStatusEl.textContent = `Shared ${fileLabel(current.file)} in #${current.room}.`;
      clearTimeout(uploadDoneTimer);
      uploadDoneTimer = setTimeout(() => {
        if (upload === null && uploadStatusEl.dataset.state === 'shared') {
          uploadStatusEl.textContent = '';
          delete uploadStatusEl.dataset.state;
        }
      }, UPLOAD_DONE_SHOWN_MS);
    } else {
      uploadFailed(current.file, problem);
    }
    nextUpload();
  }

  /** Say under the message box why `file` was not shared (after any earlier such news). */
  function uploadFailed(file, problem) {
    const said = uploadErrorEl.textContent;
    // The server's reasons may end with a full stop, or not.
    const stop = /[.!?]$/.test(problem) ? '' : '.';
    uploadErrorEl.textContent =
      `${said ? `${said} ` : ''}Could not share ${fileLabel(file)}: ${problem}${stop}`;
    if (upload === null && uploadQueue.length === 0) {
      uploadStatusEl.textContent = '';
      delete uploadStatusEl.dataset.state;
    }
  }

  /** The status under the message box, for the image under way. */
  function renderUpload() {
    const current = upload;
    uploadProgressEl.hidden = current === null;
    uploadBytesEl.hidden = current === null;
    if (current === null) return;
    clearTimeout(uploadDoneTimer);
    const name = fileLabel(current.file);
    const more = uploadQueue.length ? ` (${uploadQueue.length} more waiting)` : '';
    let text;
    if (current.stage === 'reading') {
      text = `Reading ${name}…`;
      uploadProgressEl.removeAttribute('value');
    } else {
      text = current.stage === 'sending'
        ? `Sending ${name} to #${current.room}…`
        : `Sent ${name}; the server is checking it…`;
      uploadProgressEl.max = Math.max(1, current.size);
      uploadProgressEl.value = current.sent;
    }
    uploadBytesEl.textContent = `${byteSize(current.sent)} of ${byteSize(current.size)}`;
    // Changed only with the stage: the live region is not read out per byte.
    if (uploadStatusEl.textContent !== text + more) uploadStatusEl.textContent = text + more;
    uploadStatusEl.dataset.state = current.stage;
  }

  imageButtonEl.addEventListener('click', () => imageFileEl.click());

  imageFileEl.addEventListener('change', () => {
    const files = [...imageFileEl.files];
    // Emptied, so that choosing the same file again is a change too.
    imageFileEl.value = '';
    if (files.length) shareImages(files);
  });

  /** Whether a drag carries files (not text, nor a link from another page). */
  function carriesFiles(drag) {
    return drag.dataTransfer !== null && [...drag.dataTransfer.types].includes('Files');
  }

  chatEl.addEventListener('dragover', (drag) => {
    if (!carriesFiles(drag)) return;
    // Cancelled, the drag may end in a drop here.
    drag.preventDefault();
    drag.dataTransfer.dropEffect = 'copy';
    chatEl.classList.add('drop-target');
  });

  chatEl.addEventListener('dragleave', (drag) => {
    if (!chatEl.contains(drag.relatedTarget)) chatEl.classList.remove('drop-target');
  });

  chatEl.addEventListener('drop', (drop) => {
    chatEl.classList.remove('drop-target');
    if (!carriesFiles(drop)) return;
    drop.preventDefault();
    shareImages([...drop.dataTransfer.files]);
  });

  // A file dropped beside the conversation would make the browser leave
  // the page for it: that is no place to drop one.
  document.addEventListener('dragover', (drag) => {
    if (!carriesFiles(drag) || chatEl.contains(drag.target)) return;
    drag.preventDefault();
    drag.dataTransfer.dropEffect = 'none';
  });

  document.addEventListener('drop', (drop) => {
    if (carriesFiles(drop)) drop.preventDefault();
  });

  document.addEventListener('paste', (paste) => {
    const data = paste.clipboardData;
    const files = data ? [...data.files] : [];
    // Pasted in the room or name box, it was not meant for the room.
    if (files.length === 0 || sidebarEl.contains(paste.target)) return;
    // Office programs copy text along with a picture of it: pasted in the
    // message box, the text is what was meant.
    if (paste.target === textEl && data.types.includes('text/plain')) return;
    paste.preventDefault();
    shareImages(files);
  });

  // ---------------------------------------------- small screens, keyboard

  function panelsOpen() {
    return document.body.classList.contains('panels-open');
  }

  /** Show or hide the panels of small screens (wide ones always show them). */
  function setPanels(open) {
    document.body.classList.toggle('panels-open', open);
    panelsToggleEl.setAttribute('aria-expanded', String(open));
    // The open panels cover the chat: keep Tab out of what cannot be seen.
    chatEl.inert = open && SMALL_SCREEN.matches;
  }

  /** A room was chosen in the panels: close them, and go to the message box. */
  function panelsDone() {
    if (!panelsOpen()) return;
    setPanels(false);
    (textEl.disabled ? panelsToggleEl : textEl).focus();
  }

  panelsToggleEl.addEventListener('click', () => {
    const open = !panelsOpen();
    setPanels(open);
    if (open) rooms.get(activeRoom).item.querySelector('.room-select').focus();
  });

  // Grown wide (a rotated tablet), the panels are beside the log again.
  SMALL_SCREEN.addEventListener('change', () => {
    if (panelsOpen()) setPanels(false);
  });

  document.addEventListener('keydown', (key) => {
    if (key.key === 'Escape' && panelsOpen()) {
      key.preventDefault();
      setPanels(false);
      panelsToggleEl.focus();
      return;
    }
    // Alt with the arrows: the previous or next room, from anywhere (the
    // message box included, whose own arrows are left alone).
    const arrow = key.key === 'ArrowUp' ? -1 : key.key === 'ArrowDown' ? 1 : 0;
    if (arrow !== 0 && key.altKey && !key.ctrlKey && !key.metaKey && !key.shiftKey) {
      key.preventDefault();
      selectNearbyRoom(arrow);
    }
  });

  // ---------------------------------------------------------------- start

  addRoom(LOBBY);
  loadRooms();
  selectRoom(LOBBY);
  displayNameEl.value = wantedName || '';
  connect();
})();
