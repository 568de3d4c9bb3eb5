/*
 * pubsub_wsh.c: a small publish/subscribe demo handler in C, for the ABI
 * 1.2 topic and timer functions (and the integration tests that drive
 * them).  Each text message is one command; the reply goes back to the
 * sender:
 *
 *   sub TOPIC            subscribe this connection     -> "sub 0" (the status)
 *   unsub TOPIC          end the subscription          -> "unsub 0"
 *   is TOPIC             subscribed?                   -> "is 1" / "is 0"
 *   pub TOPIC TEXT       publish TEXT to TOPIC         -> "pub N" (recipients)
 *   pubx TOPIC TEXT      the same, except to myself    -> "pubx N"
 *   big TOPIC BYTES      publish BYTES bytes (binary)  -> "big N"
 *   count TOPIC          subscribers of TOPIC          -> "count N"
 *   ccount TOPIC         subscribers across a cluster  -> "ccount N"
 *   threads TOPIC T N    T threads publish N messages "tI-J" each to TOPIC,
 *                        concurrently; the last one done publishes "done"
 *                                                      -> "threads started"
 *   timer MS             a timer for this connection   -> "timer ID"; later
 *                        on_timer sends "fired ID"
 *   itimer MS            a timer for the instance      -> "itimer ID"; later
 *                        on_timer publishes "ifired ID" to topic "itimers"
 *   cancel ID            cancel a timer                -> "cancel 0" (the status)
 *   wait                 (built with -DPUBSUB_MAY_BLOCK) block this callback
 *                        until some connection sends "release" (at most 30 s)
 *   release              end every "wait"              -> "released"
 *
 * Build: gcc -shared -fPIC -pthread -I handler-api/include handlers/c/pubsub_wsh.c \
 *            -o pubsub_wsh.so
 * Defines: -DPUBSUB_NAME="..." (default "pubsub"), -DPUBSUB_VERSION="..."
 * (default "1.0.0"), -DPUBSUB_MAY_BLOCK.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "wshd_handler.h"

#ifndef PUBSUB_NAME
#define PUBSUB_NAME "pubsub"
#endif
#ifndef PUBSUB_VERSION
#define PUBSUB_VERSION "1.0.0"
#endif
#ifdef PUBSUB_MAY_BLOCK
#define PUBSUB_FLAGS WSHD_F_MAY_BLOCK
#else
#define PUBSUB_FLAGS 0u
#endif

#define MAX_THREADS 64

/* One instance.  The host table lives for the whole process (ABI rule 4). */
typedef struct pubsub {
  const wshd_host_api *host;
  pthread_mutex_t lock; /* guards threads / n_threads */
  pthread_t threads[MAX_THREADS];
  size_t n_threads;
  atomic_int running; /* publisher threads not yet done */
} pubsub;

/* "wait" blocks until this changes; shared by every instance of this copy
 * of the library (a demo, not a pattern). */
static atomic_uint RELEASES;

static wshd_str str(const char *p, size_t n) {
  wshd_str s = {p, n};
  return s;
}

static int32_t reply(pubsub *ps, wshd_conn_id conn, const char *text) {
  return ps->host->send(ps->host->host_ctx, conn, WSHD_MSG_TEXT, (const uint8_t *)text,
                        strlen(text));
}

static int32_t pubsub_init(const wshd_host_api *host, wshd_str config, void **out) {
  (void)config;
  if (host->struct_size < WSHD_HOST_API_SIZE_1_2) {
    const char *m = "pubsub needs a host with topics (ABI 1.2)";
    host->log(host->host_ctx, WSHD_LOG_ERROR, str("pubsub", 6), str(m, strlen(m)));
    return WSHD_ERR_UNSUPPORTED;
  }
  pubsub *ps = calloc(1, sizeof *ps);
  if (ps == NULL) return WSHD_ERR_HANDLER;
  ps->host = host;
  pthread_mutex_init(&ps->lock, NULL);
  *out = ps;
  return WSHD_OK;
}

/* A publisher thread for "threads". */
typedef struct job {
  pubsub *ps;
  char topic[257];
  size_t topic_len;
  int index, count;
} job;

static void *publisher(void *arg) {
  job *j = arg;
  const wshd_host_api *h = j->ps->host;
  char msg[64];
  for (int i = 0; i < j->count; i++) {
    int n = snprintf(msg, sizeof msg, "t%d-%d", j->index, i);
    /* Host functions may be called from any thread. */
    h->publish(h->host_ctx, str(j->topic, j->topic_len), WSHD_MSG_TEXT, (const uint8_t *)msg,
               (size_t)n, 0);
  }
  if (atomic_fetch_sub(&j->ps->running, 1) == 1) {
    h->publish(h->host_ctx, str(j->topic, j->topic_len), WSHD_MSG_TEXT, (const uint8_t *)"done",
               4, 0);
  }
  free(j);
  return NULL;
}

/* The word after the command, up to the next space (or the end). */
static size_t word(const char *p, size_t len) {
  size_t n = 0;
  while (n < len && p[n] != ' ') n++;
  return n;
}

static int32_t pubsub_on_message(void *handler, void *state, wshd_conn_id conn, uint32_t kind,
                                 const uint8_t *data, size_t len) {
  (void)state;
  pubsub *ps = handler;
  const wshd_host_api *h = ps->host;
  void *ctx = h->host_ctx;
  char out[128];
  if (kind != WSHD_MSG_TEXT) return reply(ps, conn, "binary ignored");
  const char *cmd = (const char *)data;
  size_t cmd_len = word(cmd, len);
  const char *arg = cmd + cmd_len + (cmd_len < len ? 1 : 0);
  size_t arg_len = len - (size_t)(arg - cmd);
  size_t t_len = word(arg, arg_len); /* the topic, for commands that take one */
  wshd_str topic = str(arg, t_len);
  const char *rest = arg + t_len + (t_len < arg_len ? 1 : 0);
  size_t rest_len = arg_len - (size_t)(rest - arg);
  char num[32] = {0};
  memcpy(num, rest, rest_len < 31 ? rest_len : 31);
  /* The payload is not NUL-terminated (it is a slice of the server's read
     buffer, whatever follows it there): numbers are parsed from copies. */
  char arg_num[32] = {0};
  memcpy(arg_num, arg, arg_len < 31 ? arg_len : 31);

#define IS(name) (cmd_len == sizeof(name) - 1 && memcmp(cmd, name, cmd_len) == 0)
  if (IS("sub")) {
    snprintf(out, sizeof out, "sub %d", h->subscribe(ctx, conn, topic));
  } else if (IS("unsub")) {
    snprintf(out, sizeof out, "unsub %d", h->unsubscribe(ctx, conn, topic));
  } else if (IS("is")) {
    snprintf(out, sizeof out, "is %d", h->is_subscribed(ctx, conn, topic));
  } else if (IS("pub") || IS("pubx")) {
    int64_t n = h->publish(ctx, topic, WSHD_MSG_TEXT, (const uint8_t *)rest, rest_len,
                           IS("pubx") ? conn : 0);
    snprintf(out, sizeof out, "%.*s %lld", (int)cmd_len, cmd, (long long)n);
  } else if (IS("big")) {
    size_t size = strtoull(num, NULL, 10);
    uint8_t *payload = malloc(size ? size : 1);
    if (payload == NULL) return WSHD_ERR_HANDLER;
    memset(payload, 'x', size);
    /* The host copies the payload once, whatever the number of subscribers. */
    int64_t n = h->publish(ctx, topic, WSHD_MSG_BINARY, payload, size, 0);
    free(payload);
    snprintf(out, sizeof out, "big %lld", (long long)n);
  } else if (IS("count")) {
    snprintf(out, sizeof out, "count %lld", (long long)h->subscribers(ctx, topic));
  } else if (IS("ccount")) {
    snprintf(out, sizeof out, "ccount %lld", (long long)h->subscribers_cluster(ctx, topic));
  } else if (IS("threads")) {
    int threads = atoi(num), count = atoi(strchr(num, ' ') ? strchr(num, ' ') + 1 : "0");
    pthread_mutex_lock(&ps->lock);
    if (threads < 1 || ps->n_threads + (size_t)threads > MAX_THREADS || t_len > 256) {
      pthread_mutex_unlock(&ps->lock);
      return reply(ps, conn, "threads refused");
    }
    atomic_store(&ps->running, threads);
    for (int i = 0; i < threads; i++) {
      job *j = calloc(1, sizeof *j);
      if (j == NULL) break;
      j->ps = ps;
      memcpy(j->topic, arg, t_len);
      j->topic_len = t_len;
      j->index = i;
      j->count = count;
      if (pthread_create(&ps->threads[ps->n_threads], NULL, publisher, j) == 0) ps->n_threads++;
    }
    pthread_mutex_unlock(&ps->lock);
    snprintf(out, sizeof out, "threads started");
  } else if (IS("timer") || IS("itimer")) {
    uint64_t ms = strtoull(arg_num, NULL, 10);
    int64_t id = h->set_timer(ctx, IS("timer") ? conn : 0, ms);
    snprintf(out, sizeof out, "%.*s %lld", (int)cmd_len, cmd, (long long)id);
  } else if (IS("cancel")) {
    snprintf(out, sizeof out, "cancel %d", h->cancel_timer(ctx, strtoull(arg_num, NULL, 10)));
  } else if (IS("wait")) {
#ifndef PUBSUB_MAY_BLOCK
    /* Blocking here would hold one of the server's async workers. */
    return reply(ps, conn, "wait needs a build with -DPUBSUB_MAY_BLOCK");
#endif
    unsigned seen = atomic_load(&RELEASES);
    h->log(ctx, WSHD_LOG_INFO, str("pubsub", 6), str("pubsub: waiting", 15));
    struct timespec pause = {0, 1000000}; /* 1 ms */
    for (int i = 0; i < 30000 && atomic_load(&RELEASES) == seen; i++) nanosleep(&pause, NULL);
    snprintf(out, sizeof out, "waited");
  } else if (IS("release")) {
    atomic_fetch_add(&RELEASES, 1);
    snprintf(out, sizeof out, "released");
  } else {
    snprintf(out, sizeof out, "unknown command");
  }
#undef IS
  reply(ps, conn, out);
  return WSHD_OK;
}

static int32_t pubsub_on_timer(void *handler, void *state, wshd_conn_id conn, uint64_t timer) {
  (void)state;
  pubsub *ps = handler;
  char out[64];
  int n;
  n = snprintf(out, sizeof out, "pubsub: timer %llu fired for conn %llu on " PUBSUB_VERSION,
               (unsigned long long)timer, (unsigned long long)conn);
  ps->host->log(ps->host->host_ctx, WSHD_LOG_INFO, str("pubsub", 6), str(out, (size_t)n));
  if (conn != 0) {
    /* Runs between this connection's messages, never beside them. */
    n = snprintf(out, sizeof out, "fired %llu", (unsigned long long)timer);
    return ps->host->send(ps->host->host_ctx, conn, WSHD_MSG_TEXT, (const uint8_t *)out,
                          (size_t)n);
  }
  n = snprintf(out, sizeof out, "ifired %llu", (unsigned long long)timer);
  ps->host->publish(ps->host->host_ctx, str("itimers", 7), WSHD_MSG_TEXT, (const uint8_t *)out,
                    (size_t)n, 0);
  return WSHD_OK;
}

static void pubsub_destroy(void *handler) {
  pubsub *ps = handler;
  /* The contract: join every thread we started. */
  for (size_t i = 0; i < ps->n_threads; i++) pthread_join(ps->threads[i], NULL);
  pthread_mutex_destroy(&ps->lock);
  free(ps);
}

static const wshd_descriptor DESCRIPTOR = {
    .magic = WSHD_MAGIC,
    .abi_major = WSHD_ABI_MAJOR,
    .abi_minor = WSHD_ABI_MINOR,
    .struct_size = sizeof(wshd_descriptor),
    .flags = PUBSUB_FLAGS,
    .name = {PUBSUB_NAME, sizeof(PUBSUB_NAME) - 1},
    .version = {PUBSUB_VERSION, sizeof(PUBSUB_VERSION) - 1},
    .build_info = {"pubsub_wsh.c", 12},
    .init = pubsub_init,
    .on_message = pubsub_on_message,
    .destroy = pubsub_destroy,
    .on_timer = pubsub_on_timer,
};

const wshd_descriptor *wshd_entry_v1(void) { return &DESCRIPTOR; }
