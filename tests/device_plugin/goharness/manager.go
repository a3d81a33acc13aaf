package main

// Manager mode: the kubelet's complete device manager (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager
// ManagerImpl), which admits pods exactly as the kubelet does: it picks devices with its own
// allocation logic (asking the plugin's GetPreferredAllocation), calls Allocate, keeps its
// checkpoint, and hands GetDeviceRunContainerOptions (what goes to the container runtime) back.
// Its socket path is fixed at /var/lib/kubelet/device-plugins, so this mode only runs inside a
// private mount namespace (`unshare --mount`), where it mounts a tmpfs on /var/lib. The plugin
// under test is started by the harness, inside the same namespace, with its default paths.

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
)

const (
	kubeletRoot        = "/var/lib/kubelet"
	podResourcesSocket = kubeletRoot + "/pod-resources/kubelet.sock"
)

type noTopology struct{}

func (noTopology) GetAffinity(string, string) topologymanager.TopologyHint {
	return topologymanager.TopologyHint{}
}
func (noTopology) GetPolicy() topologymanager.Policy { return topologymanager.NewNonePolicy() }

type allSourcesReady struct{}

func (allSourcesReady) AddSource(string) {}
func (allSourcesReady) AllReady() bool   { return true }

// node is the kubelet stand-in in manager mode: the device manager, the pods it admitted, the
// pod-resources server over them, and the plugin process.
type node struct {
	mu      sync.Mutex
	manager *devicemanager.ManagerImpl
	pods    map[types.UID]*v1.Pod
	plugin  *exec.Cmd
}

func (n *node) activePods() []*v1.Pod {
	n.mu.Lock()
	defer n.mu.Unlock()
	pods := make([]*v1.Pod, 0, len(n.pods))
	for _, p := range n.pods {
		pods = append(pods, p)
	}
	sort.Slice(pods, func(i, j int) bool { return pods[i].Name < pods[j].Name })
	return pods
}

// --- pod-resources providers over the device manager (what the kubelet's container manager does) ---

func (n *node) GetActivePods() []*v1.Pod { return n.activePods() }
func (n *node) GetPods() []*v1.Pod       { return n.activePods() }
func (n *node) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	for _, p := range n.activePods() {
		if p.Namespace == namespace && p.Name == name {
			return p, true
		}
	}
	return nil, false
}
func (n *node) currentManager() *devicemanager.ManagerImpl {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.manager
}
func (n *node) UpdateAllocatedDevices() {
	if m := n.currentManager(); m != nil {
		m.UpdateAllocatedDevices()
	}
}
func (n *node) GetDevices(podUID, containerName string) []*podresourcesapi.ContainerDevices {
	m := n.currentManager()
	if m == nil {
		return nil
	}
	return toContainerDevices(m.GetDevices(podUID, containerName))
}
func (n *node) GetAllocatableDevices() []*podresourcesapi.ContainerDevices {
	m := n.currentManager()
	if m == nil {
		return nil
	}
	return toContainerDevices(m.GetAllocatableDevices())
}
func (n *node) GetCPUs(string, string) []int64                              { return nil }
func (n *node) GetAllocatableCPUs() []int64                                 { return nil }
func (n *node) GetMemory(string, string) []*podresourcesapi.ContainerMemory { return nil }
func (n *node) GetAllocatableMemory() []*podresourcesapi.ContainerMemory    { return nil }
func (n *node) GetDynamicResources(*v1.Pod, *v1.Container) []*podresourcesapi.DynamicResource {
	return nil
}

func toContainerDevices(devs devicemanager.ResourceDeviceInstances) []*podresourcesapi.ContainerDevices {
	var out []*podresourcesapi.ContainerDevices
	for resourceName, instances := range devs {
		for id := range instances {
			out = append(out, &podresourcesapi.ContainerDevices{ResourceName: resourceName, DeviceIds: []string{id}})
		}
	}
	return out
}

func deviceIDs(devs devicemanager.ResourceDeviceInstances, resourceName string) []string {
	ids := []string{}
	for id := range devs[resourceName] {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// --- setup ------------------------------------------------------------------------------------------

// inPrivateMountNamespace checks that this process does not share the caller's mount namespace.
// The caller (pytest) passes its own namespace in DPHARNESS_OUTER_MNT_NS (readlink /proc/self/ns/mnt)
// and starts the harness under `unshare --mount`.
func inPrivateMountNamespace() error {
	outer := os.Getenv("DPHARNESS_OUTER_MNT_NS")
	if outer == "" {
		return fmt.Errorf("DPHARNESS_OUTER_MNT_NS is not set: start under `unshare --mount` and pass the caller's mount namespace")
	}
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		return err
	}
	if self == outer {
		return fmt.Errorf("still in the caller's mount namespace %s: refusing to mount over /var/lib", self)
	}
	return nil
}

// prepareKubeletRoot mounts a tmpfs on /var/lib inside this (private) mount namespace, so the
// kubelet's fixed paths exist and nothing on the host is touched.
func prepareKubeletRoot() error {
	if err := inPrivateMountNamespace(); err != nil {
		return err
	}
	if err := syscall.Mount("none", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	if err := syscall.Mount("tmpfs", "/var/lib", "tmpfs", 0, "size=64m,mode=0755"); err != nil {
		return fmt.Errorf("mounting tmpfs on /var/lib: %w", err)
	}
	for _, dir := range []string{kubeletRoot + "/device-plugins", filepath.Dir(podResourcesSocket)} {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return err
		}
	}
	return nil
}

func (n *node) servePodResources() error {
	_ = os.Remove(podResourcesSocket)
	ln, err := net.Listen("unix", podResourcesSocket)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	podresourcesapi.RegisterPodResourcesListerServer(srv, podresources.NewV1PodResourcesServer(context.Background(),
		podresources.PodResourcesProviders{Pods: n, Devices: n, Cpus: n, Memory: n, DynamicResources: n}))
	go func() { _ = srv.Serve(ln) }()
	return nil
}

// --- commands ---------------------------------------------------------------------------------------

type managerCommand struct {
	ID          any               `json:"id"`
	Op          string            `json:"op"`
	Resource    string            `json:"resource"`
	Argv        []string          `json:"argv"`
	Log         string            `json:"log"`
	Pod         *podRef           `json:"pod"`
	Container   string            `json:"container"`
	Slices      int64             `json:"slices"`
	Annotations map[string]string `json:"annotations"`
	// Containers, when set, admits a pod of several containers (each its own resource and count)
	// instead of the single Container/Resource/Slices one.
	Containers []containerRequest `json:"containers"`
}

type containerRequest struct {
	Name     string `json:"name"`
	Resource string `json:"resource"`
	Slices   int64  `json:"slices"`
}

func (n *node) handle(c managerCommand) {
	fail := func(err error) { emit("error", c.ID, map[string]any{"op": c.Op, "error": err.Error()}) }
	switch c.Op {
	case "plugin_start":
		logFile, err := os.OpenFile(c.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			fail(err)
			return
		}
		cmd := exec.Command(c.Argv[0], c.Argv[1:]...)
		cmd.Stdout, cmd.Stderr = logFile, logFile
		if err := cmd.Start(); err != nil {
			fail(err)
			return
		}
		n.mu.Lock()
		n.plugin = cmd
		n.mu.Unlock()
		emit("plugin_started", c.ID, map[string]any{"pid": cmd.Process.Pid})
	case "plugin_kill", "plugin_stop":
		n.mu.Lock()
		cmd := n.plugin
		n.plugin = nil
		n.mu.Unlock()
		if cmd == nil {
			fail(fmt.Errorf("no plugin running"))
			return
		}
		sig := syscall.SIGKILL
		if c.Op == "plugin_stop" {
			sig = syscall.SIGTERM
		}
		_ = cmd.Process.Signal(sig)
		err := cmd.Wait()
		code := 0
		if exit, ok := err.(*exec.ExitError); ok {
			code = exit.ExitCode()
		}
		emit("plugin_exited", c.ID, map[string]any{"code": code})
	case "manager_start":
		// A kubelet (re)start: a fresh device manager that reads its own checkpoint.
		m, err := devicemanager.NewManagerImpl(nil, noTopology{})
		if err != nil {
			fail(err)
			return
		}
		if err := m.Start(n.activePods, allSourcesReady{}, containermap.NewContainerMap(), sets.New[string]()); err != nil {
			fail(err)
			return
		}
		n.mu.Lock()
		n.manager = m
		n.mu.Unlock()
		emit("manager_started", c.ID, nil)
	case "manager_stop":
		if m := n.currentManager(); m != nil {
			_ = m.Stop()
		}
		n.mu.Lock()
		n.manager = nil
		n.mu.Unlock()
		emit("manager_stopped", c.ID, nil)
	case "capacity":
		m := n.currentManager()
		if m == nil {
			fail(fmt.Errorf("device manager not started"))
			return
		}
		capacity, allocatable, _ := m.GetCapacity()
		q := func(l v1.ResourceList, name v1.ResourceName) int64 { v := l[name]; return v.Value() }
		all := map[string]any{}
		for name := range capacity {
			all[string(name)] = map[string]int64{"capacity": q(capacity, name), "allocatable": q(allocatable, name)}
		}
		emit("capacity", c.ID, map[string]any{"capacity": q(capacity, v1.ResourceName(c.Resource)),
			"allocatable": q(allocatable, v1.ResourceName(c.Resource)), "resources": all})
	case "admit":
		n.admit(c, fail)
	case "remove_pod":
		n.mu.Lock()
		delete(n.pods, types.UID(c.Pod.UID))
		n.mu.Unlock()
		n.UpdateAllocatedDevices()
		emit("removed", c.ID, nil)
	case "quit":
		n.mu.Lock()
		if n.plugin != nil {
			_ = n.plugin.Process.Signal(syscall.SIGTERM)
			_ = n.plugin.Wait()
		}
		n.mu.Unlock()
		emit("bye", c.ID, nil)
		os.Exit(0)
	default:
		fail(fmt.Errorf("unknown op %q", c.Op))
	}
}

// admit runs the kubelet's pod admission: ManagerImpl.Allocate for each container in order (as the
// kubelet does), then the options the container runtime would get for each.
func (n *node) admit(c managerCommand, fail func(error)) {
	m := n.currentManager()
	if m == nil || c.Pod == nil {
		fail(fmt.Errorf("admit needs a started device manager and a pod"))
		return
	}
	requests := c.Containers
	if len(requests) == 0 {
		requests = []containerRequest{{Name: c.Container, Resource: c.Resource, Slices: c.Slices}}
	}
	containers := make([]v1.Container, 0, len(requests))
	for _, r := range requests {
		q := *resource.NewQuantity(r.Slices, resource.DecimalSI)
		containers = append(containers, v1.Container{Name: r.Name, Resources: v1.ResourceRequirements{
			Limits:   v1.ResourceList{v1.ResourceName(r.Resource): q},
			Requests: v1.ResourceList{v1.ResourceName(r.Resource): q},
		}})
	}
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: c.Pod.Name, Namespace: c.Pod.Namespace, UID: types.UID(c.Pod.UID),
			Annotations: c.Annotations, CreationTimestamp: metav1.NewTime(time.Now())},
		Spec: v1.PodSpec{Containers: containers},
	}
	n.mu.Lock()
	n.pods[pod.UID] = pod
	n.mu.Unlock()
	results := []map[string]any{}
	for i := range pod.Spec.Containers {
		container := &pod.Spec.Containers[i]
		if err := m.Allocate(pod, container); err != nil {
			n.mu.Lock()
			delete(n.pods, pod.UID)
			n.mu.Unlock()
			fail(err)
			return
		}
		opts, err := m.GetDeviceRunContainerOptions(pod, container)
		if err != nil {
			fail(err)
			return
		}
		envs := map[string]string{}
		for _, e := range opts.Envs {
			envs[e.Name] = e.Value
		}
		mounts := []map[string]any{}
		for _, mt := range opts.Mounts {
			mounts = append(mounts, map[string]any{"container_path": mt.ContainerPath, "host_path": mt.HostPath,
				"read_only": mt.ReadOnly})
		}
		devices := []map[string]any{}
		for _, d := range opts.Devices {
			devices = append(devices, map[string]any{"container_path": d.PathInContainer, "host_path": d.PathOnHost,
				"permissions": d.Permissions})
		}
		r := requests[i]
		results = append(results, map[string]any{"name": container.Name, "resource": r.Resource,
			"ids": deviceIDs(m.GetDevices(c.Pod.UID, container.Name), r.Resource), "envs": envs, "mounts": mounts,
			"devices": devices})
	}
	reply := map[string]any{"containers": results}
	for k, v := range results[0] { // the single-container form keeps its flat reply
		reply[k] = v
	}
	emit("admitted", c.ID, reply)
}

func runManagerMode() {
	if err := prepareKubeletRoot(); err != nil {
		fmt.Fprintln(os.Stderr, "dpharness:", err)
		os.Exit(3)
	}
	n := &node{pods: map[types.UID]*v1.Pod{}}
	if err := n.servePodResources(); err != nil {
		fmt.Fprintln(os.Stderr, "dpharness:", err)
		os.Exit(3)
	}
	emit("ready", nil, map[string]any{"mode": "manager", "kubelet_root": kubeletRoot,
		"pod_resources_socket": podResourcesSocket})
	readCommands(func(line []byte) {
		var c managerCommand
		if !decode(line, &c) {
			return
		}
		if c.Resource == "" {
			c.Resource = "vnpu.io/memory-0" // one resource per device: commands name theirs
		}
		if c.Container == "" {
			c.Container = "main"
		}
		n.handle(c)
	})
}
