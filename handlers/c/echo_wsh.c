/*
 * c_echo: the echo handler written in C against handler-api/include/wshd_handler.h.
 *
 * It echoes every text and binary message.  The text "Goodbye" is echoed and
 * then the connection is closed normally (1000), like the Rust echo handler
 * and pywebsocket's echo_wsh.py.  It logs through host->log on init, on each
 * close (debug) and on send failures.
 *
 * Build (from the repository root; OUT is any directory):
 *
 *   gcc -shared -fPIC -O2 -Wall -Wextra -Werror -I handler-api/include \
 *       handlers/c/echo_wsh.c -o OUT/c_echo_wsh.so
 *
 * The file name c_echo_wsh.so makes it the handler named "c_echo":
 *
 *   [[route]]
 *   path = "/c_echo"
 *   handler = "c_echo"
 *
 * The file also builds as strict C99 (-std=c99 -pedantic).  Options:
 *
 *   -DECHO_PREFIX='"v2:"'     prepend this to every text echo (the reload
 *                             tests build two versions and tell them apart)
 *   -DECHO_VERSION='"0.2.0"'  the descriptor's version (default "0.1.0")
 *   -DECHO_NAME='"other"'     the handler name (default "c_echo"); it must
 *                             match the file name (other_wsh.so)
 *
 * Broken builds for the server's ABI-mismatch tests (use one at a time):
 *
 *   -DWSHD_BREAK_MAGIC    the descriptor's magic is wrong
 *   -DWSHD_BREAK_MAJOR    the descriptor claims ABI major 2
 *   -DWSHD_BREAK_SIZE     the descriptor's struct_size is 16
 *   -DWSHD_BREAK_MISSING  the required on_message callback is NULL
 *   -DWSHD_NO_ENTRY       no wshd_entry_v1 symbol at all (the descriptor is
 *                         exported as c_echo_descriptor instead)
 *
 * For the server's reload-budget test:
 *
 *   -DWSHD_TAKE_KEYS=N    init takes N pthread keys and never frees them, as
 *                         N versions of a Rust handler would
 *
 * For the server's crash tests (handler code that ends the process):
 *
 *   -DWSHD_TEST_EXIT_IN_CTOR  a constructor calls exit(0) during dlopen
 *   -DWSHD_TEST_CRASH         on_message ends the process on magic texts:
 *                             "exit" calls exit(0), "segv" stores through an
 *                             invalid pointer (SIGSEGV), "abort" calls
 *                             abort(), "thread-exit" starts a thread that
 *                             calls exit(0)
 *
 * For the server's rollout tests (a broken new version):
 *
 *   -DECHO_FAIL_MESSAGES      on_message fails every message with
 *                             WSHD_ERR_HANDLER, so each connection's first
 *                             message closes it with 1011
 */
#include <stdlib.h>
#include <string.h>
#if defined(WSHD_TAKE_KEYS) || defined(WSHD_TEST_CRASH)
#include <pthread.h>
#endif
#if defined(WSHD_TEST_CRASH)
#include <stdint.h>
#endif

#include "wshd_handler.h"

#ifndef ECHO_PREFIX
#define ECHO_PREFIX ""
#endif
#ifndef ECHO_VERSION
#define ECHO_VERSION "0.1.0"
#endif
#ifndef ECHO_NAME
#define ECHO_NAME "c_echo"
#endif
#ifdef __VERSION__
#define ECHO_BUILD_INFO "C; " __VERSION__
#else
#define ECHO_BUILD_INFO "C"
#endif

/* A string literal as a wshd_str (no NUL: the ABI passes lengths). */
#define LIT(s) wshd_str_of((s), sizeof(s) - 1)

#define GOODBYE "Goodbye"
#define PREFIX_LEN (sizeof(ECHO_PREFIX) - 1)

/* The handler instance: init allocates it, destroy frees it. */
typedef struct echo_handler {
  const wshd_host_api *host; /* valid for the life of the process */
} echo_handler;

static wshd_str wshd_str_of(const char *ptr, size_t len) {
  wshd_str s;
  s.ptr = ptr;
  s.len = len;
  return s;
}

static void log_line(const wshd_host_api *host, uint32_t level, wshd_str msg) {
  host->log(host->host_ctx, level, LIT(ECHO_NAME), msg);
}

static int32_t echo_init(const wshd_host_api *host, wshd_str config, void **out_handler) {
  echo_handler *h;
  (void)config; /* no route config keys */
  if (host == NULL || out_handler == NULL) {
    return WSHD_ERR_INVALID;
  }
  if (host->struct_size < sizeof(wshd_host_api)) {
    return WSHD_ERR_UNSUPPORTED;
  }
  h = (echo_handler *)malloc(sizeof *h);
  if (h == NULL) {
    log_line(host, WSHD_LOG_ERROR, LIT("c_echo: out of memory"));
    return WSHD_ERR_HANDLER;
  }
  h->host = host;
#if defined(WSHD_TAKE_KEYS)
  {
    int i;
    pthread_key_t key;
    for (i = 0; i < (WSHD_TAKE_KEYS); i++) {
      if (pthread_key_create(&key, NULL) != 0) {
        log_line(host, WSHD_LOG_WARN, LIT("c_echo: out of pthread keys"));
        break;
      }
    }
  }
#endif
  *out_handler = h;
  log_line(host, WSHD_LOG_INFO, LIT("c_echo " ECHO_VERSION " ready (text prefix \"" ECHO_PREFIX "\")"));
  return WSHD_OK;
}

/* Sends kind/data with ECHO_PREFIX in front of text.  The host copies the
 * payload before returning, so a stack buffer is fine. */
static int32_t echo_send(const wshd_host_api *host, wshd_conn_id conn, uint32_t kind, const uint8_t *data,
                         size_t len) {
  uint8_t small[256];
  uint8_t *buf = small;
  int32_t rc;
  if (kind != WSHD_MSG_TEXT || PREFIX_LEN == 0) {
    return host->send(host->host_ctx, conn, kind, data, len);
  }
  if (len > sizeof small - PREFIX_LEN) {
    buf = (uint8_t *)malloc(PREFIX_LEN + len);
    if (buf == NULL) {
      return WSHD_ERR_HANDLER;
    }
  }
  memcpy(buf, ECHO_PREFIX, PREFIX_LEN);
  if (len > 0) {
    memcpy(buf + PREFIX_LEN, data, len);
  }
  rc = host->send(host->host_ctx, conn, kind, buf, PREFIX_LEN + len);
  if (buf != small) {
    free(buf);
  }
  return rc;
}

#if defined(WSHD_TEST_EXIT_IN_CTOR)
__attribute__((constructor)) static void exit_in_ctor(void) { exit(0); }
#endif

#if defined(WSHD_TEST_CRASH)
/* volatile, so the compiler cannot see the address is bad and emit a trap
 * (SIGILL) instead of the store. */
static volatile uintptr_t bad_address = 16;

static void *exit_from_thread(void *arg) {
  (void)arg;
  exit(0);
}

#define IS(lit) (len == sizeof(lit) - 1 && memcmp(data, lit, len) == 0)
static void maybe_crash(const uint8_t *data, size_t len) {
  if (IS("exit")) {
    exit(0);
  }
  if (IS("segv")) {
    *(volatile int *)bad_address = 1;
  }
  if (IS("abort")) {
    abort();
  }
  if (IS("thread-exit")) {
    pthread_t t;
    if (pthread_create(&t, NULL, exit_from_thread, NULL) == 0) {
      pthread_join(t, NULL); /* never returns: the thread ends the process */
    }
  }
}
#undef IS
#endif

static int32_t echo_on_message(void *handler, void *conn_state, wshd_conn_id conn, uint32_t kind,
                               const uint8_t *data, size_t len) {
  const echo_handler *h = (const echo_handler *)handler;
  int32_t rc;
  (void)conn_state; /* no on_open, so always NULL */
#if defined(WSHD_TEST_CRASH)
  maybe_crash(data, len);
#endif
#if defined(ECHO_FAIL_MESSAGES)
  (void)h;
  (void)conn;
  (void)kind;
  (void)data;
  (void)len;
  (void)rc;
  return WSHD_ERR_HANDLER;
#endif
  rc = echo_send(h->host, conn, kind, data, len);
  if (rc == WSHD_ERR_CLOSED) {
    return WSHD_OK; /* the peer is gone; on_close is on its way */
  }
  if (rc != WSHD_OK) {
    log_line(h->host, WSHD_LOG_WARN, LIT("c_echo: send failed; closing the connection"));
    return WSHD_ERR_HANDLER;
  }
  if (kind == WSHD_MSG_TEXT && len == sizeof(GOODBYE) - 1 && memcmp(data, GOODBYE, len) == 0) {
    h->host->close(h->host->host_ctx, conn, 1000, wshd_str_of(NULL, 0));
  }
  return WSHD_OK;
}

static void echo_on_close(void *handler, void *conn_state, wshd_conn_id conn, uint16_t code, wshd_str reason) {
  const echo_handler *h = (const echo_handler *)handler;
  (void)conn_state;
  (void)conn;
  (void)code;
  (void)reason;
  log_line(h->host, WSHD_LOG_DEBUG, LIT("c_echo: connection closed"));
}

static void echo_destroy(void *handler) {
#if defined(WSHD_BREAK_MISSING)
  (void)echo_on_message; /* unused in this broken build; keep -Werror quiet */
#endif
  free(handler); /* no threads to join */
}

#if defined(WSHD_BREAK_MAGIC)
#define DESC_MAGIC 0x21444142u /* "BAD!" */
#else
#define DESC_MAGIC WSHD_MAGIC
#endif
#if defined(WSHD_BREAK_MAJOR)
#define DESC_MAJOR 2u
#else
#define DESC_MAJOR WSHD_ABI_MAJOR
#endif
#if defined(WSHD_BREAK_SIZE)
#define DESC_SIZE 16u
#else
#define DESC_SIZE ((uint32_t)sizeof(wshd_descriptor))
#endif
#if defined(WSHD_BREAK_MISSING)
#define DESC_ON_MESSAGE NULL
#else
#define DESC_ON_MESSAGE echo_on_message
#endif

static const wshd_descriptor DESCRIPTOR = {
    DESC_MAGIC,
    DESC_MAJOR,
    WSHD_ABI_MINOR,
    DESC_SIZE,
    0u, /* flags: never blocks; not the Rust SDK */
    {ECHO_NAME, sizeof(ECHO_NAME) - 1},
    {ECHO_VERSION, sizeof(ECHO_VERSION) - 1},
    {ECHO_BUILD_INFO, sizeof(ECHO_BUILD_INFO) - 1},
    echo_init,
    NULL, /* on_handshake: accept every handshake, no subprotocol */
    NULL, /* on_open: no per-connection state */
    DESC_ON_MESSAGE,
    echo_on_close,
    echo_destroy,
    NULL, /* on_timer (ABI 1.2): no timers */
    NULL, /* on_export (ABI 1.2): no connection handover; a reload drains */
    NULL, /* on_import (ABI 1.2) */
};

#if defined(WSHD_NO_ENTRY)
const wshd_descriptor *c_echo_descriptor(void);
const wshd_descriptor *c_echo_descriptor(void) { return &DESCRIPTOR; }
#else
const wshd_descriptor *wshd_entry_v1(void) { return &DESCRIPTOR; }
#endif
