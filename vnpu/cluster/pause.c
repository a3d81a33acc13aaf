/* The first process of every pod sandbox on vnpu's local test node (containerd's sandbox_image).
 * It holds the pod's namespaces open, reaps the zombies a shared PID namespace leaves behind and
 * exits cleanly on SIGINT/SIGTERM. Built with `gcc -static -Os` by vnpu/cluster/images.py. */
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { _exit(sig == SIGTERM || sig == SIGINT ? 0 : 1); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction term = {.sa_handler = stop};
    struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    if (getpid() != 1) fputs("pause: warning: not running as PID 1\n", stderr);
    if (sigaction(SIGINT, &term, NULL) || sigaction(SIGTERM, &term, NULL) ||
        sigaction(SIGCHLD, &child, NULL)) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) pause();
}
