/*
 * The C anchor of the benchmark harness (python -m bench): io_uring driven directly through
 * liburing, with nothing between the program and the ring, so the pure-Rust and Python senders
 * can be read against the cheapest sender there is.
 *
 *   c_sender --connect HOST:PORT --size BYTES --inflight N [--seconds S] [--max-bytes B]
 *            [--mode send_zc|send_zc_fixed|send] [--cpu CPU]
 *
 * Keeps N sends of BYTES in flight on one TCP connection, each from its own buffer, reused only
 * once its send is done: for SEND_ZC when the notification CQE arrived (the kernel released the
 * pages), for plain send when its CQE arrived. send_zc_fixed sends from buffers registered with
 * the ring. Every batch of ready requests goes in one io_uring_enter that also waits for the next
 * completion. Requests carry MSG_WAITALL and are not linked: like liburing's send-zerocopy
 * example it counts bytes and leaves their order to chance (the receiver only counts them).
 * After S seconds or B bytes it stops submitting, waits for every release, shuts the write side
 * and reads the receiver's 8-byte acknowledgement, then prints one JSON line in the harness's
 * shape: elapsed seconds, bytes, sends, the CPU time of the sending span (getrusage), peak RSS.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Older liburing headers lack these (kernel 6.2 ABI values). */
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif

enum mode { SEND_ZC, SEND_ZC_FIXED, SEND };

struct slot {
	size_t offset;	   /* bytes of the current send the kernel accepted */
	int notifications; /* SEND_ZC notifications still to come */
};

static void die(const char *what, int err)
{
	fprintf(stderr, "c_sender: %s: %s\n", what, strerror(err));
	exit(1);
}

static void usage(const char *message)
{
	fprintf(stderr, "c_sender: %s\nusage: c_sender --connect HOST:PORT --size BYTES "
			"--inflight N [--seconds S] [--max-bytes B] "
			"[--mode send_zc|send_zc_fixed|send] [--cpu CPU]\n",
		message);
	exit(2);
}

/* Busy CPU time of the whole machine (every CPU, every process, interrupts included) from the
 * first line of /proc/stat, in seconds: where the kernel's deferred copy shows up on veth. */
static double system_busy(void)
{
	unsigned long long v[10] = {0};
	FILE *f = fopen("/proc/stat", "r");
	if (!f)
		return 0;
	int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1],
		       &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]);
	fclose(f);
	if (n < 8)
		return 0;
	/* user nice system idle iowait irq softirq steal (guest time is inside user) */
	unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
	return (double)busy / (double)sysconf(_SC_CLK_TCK);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double seconds_of(struct timeval tv)
{
	return tv.tv_sec + tv.tv_usec / 1e6;
}

/* Queue buffer i's send from offset on; the next io_uring_enter hands it to the kernel. */
static void queue_send(struct io_uring *ring, int fd, enum mode mode, char *buf, size_t size,
		       size_t offset, unsigned i)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
	unsigned zc_flags = IORING_SEND_ZC_REPORT_USAGE;
	if (mode == SEND)
		io_uring_prep_send(sqe, fd, buf + offset, size - offset, MSG_WAITALL);
	else if (mode == SEND_ZC)
		io_uring_prep_send_zc(sqe, fd, buf + offset, size - offset, MSG_WAITALL, zc_flags);
	else
		io_uring_prep_send_zc_fixed(sqe, fd, buf + offset, size - offset, MSG_WAITALL,
					    zc_flags, i);
	io_uring_sqe_set_data64(sqe, i);
}

static int connect_to(const char *address)
{
	char host[256];
	const char *colon = strrchr(address, ':');
	if (!colon || (size_t)(colon - address) >= sizeof(host))
		usage("--connect wants HOST:PORT");
	memcpy(host, address, colon - address);
	host[colon - address] = '\0';
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
	if (inet_pton(AF_INET, host, &sin.sin_addr) != 1)
		usage("--connect wants an IPv4 address");
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket", errno);
	if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) < 0)
		die("connect", errno);
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

int main(int argc, char **argv)
{
	const char *address = NULL;
	size_t size = 0;
	unsigned inflight = 1;
	double seconds = 1.0;
	uint64_t max_bytes = UINT64_MAX;
	enum mode mode = SEND_ZC;
	int cpu = -1;
	for (int i = 1; i < argc; i += 2) {
		if (i + 1 >= argc)
			usage("every option needs a value");
		const char *flag = argv[i], *value = argv[i + 1];
		if (!strcmp(flag, "--connect"))
			address = value;
		else if (!strcmp(flag, "--size"))
			size = strtoull(value, NULL, 10);
		else if (!strcmp(flag, "--inflight"))
			inflight = strtoul(value, NULL, 10);
		else if (!strcmp(flag, "--seconds"))
			seconds = strtod(value, NULL);
		else if (!strcmp(flag, "--max-bytes"))
			max_bytes = strtoull(value, NULL, 10);
		else if (!strcmp(flag, "--cpu"))
			cpu = atoi(value);
		else if (!strcmp(flag, "--mode")) {
			if (!strcmp(value, "send_zc"))
				mode = SEND_ZC;
			else if (!strcmp(value, "send_zc_fixed"))
				mode = SEND_ZC_FIXED;
			else if (!strcmp(value, "send"))
				mode = SEND;
			else
				usage("unknown --mode");
		} else
			usage("unknown option");
	}
	if (!address || size == 0 || inflight == 0)
		usage("--connect, --size and --inflight are required (and non-zero)");
	if (cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set) < 0)
			die("sched_setaffinity", errno);
	}
	int fd = connect_to(address);

	struct io_uring ring;
	/* Room for every request and both of its CQEs. */
	int rc = io_uring_queue_init(inflight < 4 ? 8 : 2 * inflight, &ring, 0);
	if (rc < 0)
		die("io_uring_queue_init", -rc);
	char **bufs = calloc(inflight, sizeof(*bufs));
	struct iovec *iovs = calloc(inflight, sizeof(*iovs));
	struct slot *slots = calloc(inflight, sizeof(*slots));
	if (!bufs || !iovs || !slots)
		die("calloc", ENOMEM);
	for (unsigned i = 0; i < inflight; i++) {
		if (posix_memalign((void **)&bufs[i], 4096, size))
			die("posix_memalign", ENOMEM);
		memset(bufs[i], 0xa5, size); /* every page exists before the clock starts */
		iovs[i] = (struct iovec){.iov_base = bufs[i], .iov_len = size};
	}
	if (mode == SEND_ZC_FIXED) {
		rc = io_uring_register_buffers(&ring, iovs, inflight);
		if (rc < 0)
			die("io_uring_register_buffers", -rc);
	}

	struct rusage before, after;
	double busy_before = system_busy(); /* outside the span the two getrusage calls mark */
	getrusage(RUSAGE_SELF, &before);
	double start = now(), deadline = start + seconds;
	uint64_t bytes = 0, sends = 0, notifications = 0, copied_by_kernel = 0;
	unsigned busy = 0;
	int stopping = 0;
	for (unsigned i = 0; i < inflight && !stopping; i++) {
		slots[i] = (struct slot){0};
		queue_send(&ring, fd, mode, bufs[i], size, slots[i].offset, i);
		busy++;
		sends++;
		bytes += size;
		stopping = bytes >= max_bytes || now() >= deadline;
	}
	while (busy) {
		rc = io_uring_submit_and_wait(&ring, 1);
		if (rc < 0 && rc != -EINTR)
			die("io_uring_submit_and_wait", -rc);
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&ring, head, cqe)
		{
			seen++;
			unsigned i = (unsigned)cqe->user_data;
			struct slot *slot = &slots[i];
			if (cqe->flags & IORING_CQE_F_NOTIF) {
				slot->notifications--;
				notifications++;
				if (cqe->res & IORING_NOTIF_USAGE_ZC_COPIED)
					copied_by_kernel++;
			} else {
				if (cqe->flags & IORING_CQE_F_MORE)
					slot->notifications++;
				if (cqe->res < 0)
					die("send", -cqe->res);
				slot->offset += cqe->res;
				if (slot->offset < size) {
					/* A short send: the rest goes next. */
					queue_send(&ring, fd, mode, bufs[i], size, slot->offset, i);
					continue;
				}
			}
			if (slot->offset < size || slot->notifications > 0)
				continue;
			if (stopping) {
				busy--;
				continue;
			}
			slot->offset = 0;
			queue_send(&ring, fd, mode, bufs[i], size, slots[i].offset, i);
			sends++;
			bytes += size;
			stopping = bytes >= max_bytes || now() >= deadline;
		}
		io_uring_cq_advance(&ring, seen);
	}

	if (shutdown(fd, SHUT_WR) < 0)
		die("shutdown", errno);
	uint64_t ack = 0;
	size_t got = 0;
	while (got < sizeof(ack)) {
		ssize_t n = read(fd, (char *)&ack + got, sizeof(ack) - got);
		if (n <= 0)
			die("reading the receiver's acknowledgement", n < 0 ? errno : ECONNRESET);
		got += n;
	}
	double elapsed = now() - start;
	getrusage(RUSAGE_SELF, &after);
	double system_cpu = system_busy() - busy_before;
	if (ack != bytes) {
		fprintf(stderr, "c_sender: sent %llu bytes, the receiver read %llu\n",
			(unsigned long long)bytes, (unsigned long long)ack);
		return 1;
	}
	/* What the kernel copied anyway (local delivery) counts as copied, as zerosend counts it;
	 * in proportion to the notifications that said so. */
	uint64_t zerocopy = 0;
	if (mode != SEND && notifications)
		zerocopy = (uint64_t)((double)bytes * (notifications - copied_by_kernel) / notifications);
	printf("{\"elapsed\": %.6f, \"bytes\": %llu, \"sends\": %llu, \"cpu_user\": %.6f, "
	       "\"cpu_sys\": %.6f, \"system_cpu\": %.6f, \"maxrss_kib\": %ld, \"backend\": \"%s\", \"connections\": 1, "
	       "\"stats\": {\"sends\": %llu, \"bytes_zerocopy\": %llu, \"bytes_copied\": %llu, "
	       "\"bytes_copied_by_kernel\": %llu, \"bytes_copied_requested\": %llu}}\n",
	       elapsed, (unsigned long long)bytes, (unsigned long long)sends,
	       seconds_of(after.ru_utime) - seconds_of(before.ru_utime),
	       seconds_of(after.ru_stime) - seconds_of(before.ru_stime), system_cpu, after.ru_maxrss,
	       mode == SEND ? "copy" : "io_uring", (unsigned long long)sends,
	       (unsigned long long)zerocopy, (unsigned long long)(bytes - zerocopy),
	       (unsigned long long)(mode == SEND ? 0 : bytes - zerocopy),
	       (unsigned long long)(mode == SEND ? bytes : 0));
	io_uring_queue_exit(&ring);
	return 0;
}
