// dpharness plays the kubelet's side of the device-plugin API with the kubelet's own code, so the
// Python plugin is tested against the real registration server and plugin client
// (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1) and, for the restart scenario,
// the kubelet's real pod-resources v1 server (k8s.io/kubernetes/pkg/kubelet/apis/podresources).
// With --manager it runs the kubelet's whole device manager instead (manager.go).
//
// Protocol: one JSON command per line on stdin, one JSON object per line on stdout. Replies carry
// the command's "id"; asynchronous events (connected, disconnected, devices, cleanup) carry none.
// Every line has "kind" and "t" (Unix milliseconds). See tests/device_plugin/harness.py.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	podresourcesapi "k8s.io/kubelet/pkg/apis/podresources/v1"
	"k8s.io/kubernetes/pkg/kubelet/apis/podresources"
	plugin "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1"
)

// kubeletSocketName is the registration socket's file name inside the plugin directory.
var kubeletSocketName = filepath.Base(pluginapi.KubeletSocket)

// out serialises all stdout writes.
var out = struct {
	sync.Mutex
	enc *json.Encoder
}{enc: json.NewEncoder(os.Stdout)}

func emit(kind string, id any, fields map[string]any) {
	msg := map[string]any{"kind": kind, "t": time.Now().UnixMilli()}
	if id != nil {
		msg["id"] = id
	}
	for k, v := range fields {
		msg[k] = v
	}
	out.Lock()
	defer out.Unlock()
	_ = out.enc.Encode(msg)
}

// kubelet is the harness's stand-in for the device manager: it implements the handler
// interfaces the real registration server calls, and remembers allocations per pod like the
// kubelet's podDevices so the pod-resources server can report them.
type kubelet struct {
	mu      sync.Mutex
	dir     string
	server  plugin.Server
	plugins map[string]plugin.DevicePlugin
	pods    map[types.UID]*podEntry
}

type podEntry struct {
	pod     *v1.Pod
	devices map[string]map[string][]string // container -> resource -> device IDs
}

// CleanupPluginDirectory mirrors the kubelet's device manager: on start, remove every socket in
// the plugin directory (the kubelet's own checkpoint file aside).
func (k *kubelet) CleanupPluginDirectory(dir string) error {
	names, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	removed := []string{}
	for _, entry := range names {
		path := filepath.Join(dir, entry.Name())
		st, err := os.Stat(path)
		if err != nil || st.IsDir() || st.Mode()&os.ModeSocket == 0 || entry.Name() == "kubelet_internal_checkpoint" {
			continue
		}
		if err := os.RemoveAll(path); err == nil {
			removed = append(removed, entry.Name())
		}
	}
	emit("cleanup", nil, map[string]any{"dir": dir, "removed": removed})
	return nil
}

func (k *kubelet) PluginConnected(resource string, p plugin.DevicePlugin) error {
	k.mu.Lock()
	k.plugins[resource] = p
	k.mu.Unlock()
	emit("connected", nil, map[string]any{"resource": resource, "socket": p.SocketPath()})
	return nil
}

func (k *kubelet) PluginDisconnected(resource string) {
	k.mu.Lock()
	delete(k.plugins, resource)
	k.mu.Unlock()
	emit("disconnected", nil, map[string]any{"resource": resource})
}

func (k *kubelet) PluginListAndWatchReceiver(resource string, resp *pluginapi.ListAndWatchResponse) {
	devices := make([]map[string]any, 0, len(resp.Devices))
	healthy := 0
	for _, d := range resp.Devices {
		numa := []int64{}
		if d.Topology != nil {
			for _, n := range d.Topology.Nodes {
				numa = append(numa, n.ID)
			}
		}
		if d.Health == pluginapi.Healthy {
			healthy++
		}
		devices = append(devices, map[string]any{"id": d.ID, "health": d.Health, "numa": numa})
	}
	emit("devices", nil, map[string]any{"resource": resource, "devices": devices, "total": len(devices),
		"healthy": healthy, "bytes": proto.Size(resp)})
}

func (k *kubelet) client(resource string) (pluginapi.DevicePluginClient, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	p, ok := k.plugins[resource]
	if !ok {
		return nil, fmt.Errorf("no plugin connected for %q", resource)
	}
	return p.API(), nil
}

// --- pod-resources providers, fed by allocations the harness performed -----------------------------

func (k *kubelet) GetActivePods() []*v1.Pod { return k.GetPods() }

func (k *kubelet) GetPods() []*v1.Pod {
	k.mu.Lock()
	defer k.mu.Unlock()
	pods := make([]*v1.Pod, 0, len(k.pods))
	for _, e := range k.pods {
		pods = append(pods, e.pod)
	}
	sort.Slice(pods, func(i, j int) bool { return pods[i].Name < pods[j].Name })
	return pods
}

func (k *kubelet) GetPodByName(namespace, name string) (*v1.Pod, bool) {
	for _, p := range k.GetPods() {
		if p.Namespace == namespace && p.Name == name {
			return p, true
		}
	}
	return nil, false
}

func (k *kubelet) UpdateAllocatedDevices() {}

func (k *kubelet) GetDevices(podUID, containerName string) []*podresourcesapi.ContainerDevices {
	k.mu.Lock()
	defer k.mu.Unlock()
	e, ok := k.pods[types.UID(podUID)]
	if !ok {
		return nil
	}
	var result []*podresourcesapi.ContainerDevices
	for resource, ids := range e.devices[containerName] {
		result = append(result, &podresourcesapi.ContainerDevices{ResourceName: resource, DeviceIds: ids})
	}
	return result
}

func (k *kubelet) GetAllocatableDevices() []*podresourcesapi.ContainerDevices { return nil }
func (k *kubelet) GetCPUs(podUID, containerName string) []int64               { return nil }
func (k *kubelet) GetAllocatableCPUs() []int64                                { return nil }
func (k *kubelet) GetMemory(podUID, containerName string) []*podresourcesapi.ContainerMemory {
	return nil
}
func (k *kubelet) GetAllocatableMemory() []*podresourcesapi.ContainerMemory { return nil }
func (k *kubelet) GetDynamicResources(pod *v1.Pod, container *v1.Container) []*podresourcesapi.DynamicResource {
	return nil
}

func (k *kubelet) recordPod(ref podRef, container, resource string, ids []string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	uid := types.UID(ref.UID)
	e, ok := k.pods[uid]
	if !ok {
		e = &podEntry{
			pod: &v1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: ref.Name, Namespace: ref.Namespace, UID: uid},
			},
			devices: map[string]map[string][]string{},
		}
		k.pods[uid] = e
	}
	e.pod.Spec.Containers = append(e.pod.Spec.Containers, v1.Container{Name: container})
	if e.devices[container] == nil {
		e.devices[container] = map[string][]string{}
	}
	e.devices[container][resource] = ids
}

func (k *kubelet) removePod(uid string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	_, ok := k.pods[types.UID(uid)]
	delete(k.pods, types.UID(uid))
	return ok
}

// --- commands -----------------------------------------------------------------------------------------

type podRef struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
}

type command struct {
	ID        any      `json:"id"`
	Op        string   `json:"op"`
	Resource  string   `json:"resource"`
	IDs       []string `json:"ids"`
	Available []string `json:"available"`
	Must      []string `json:"must"`
	Size      int32    `json:"size"`
	Pod       *podRef  `json:"pod"`
	Container string   `json:"container"`
	Socket    string   `json:"socket"`
}

func (k *kubelet) handle(c command) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fail := func(err error) { emit("error", c.ID, map[string]any{"op": c.Op, "error": err.Error()}) }
	switch c.Op {
	case "start":
		s, err := plugin.NewServer(filepath.Join(k.dir, kubeletSocketName), k, k)
		if err != nil {
			fail(err)
			return
		}
		if err := s.Start(); err != nil {
			fail(err)
			return
		}
		k.mu.Lock()
		k.server = s
		k.mu.Unlock()
		emit("started", c.ID, map[string]any{"socket": s.SocketPath()})
	case "stop":
		k.mu.Lock()
		s := k.server
		k.server = nil
		k.mu.Unlock()
		if s != nil {
			if err := s.Stop(); err != nil {
				fail(err)
				return
			}
		}
		emit("stopped", c.ID, nil)
	case "options":
		cl, err := k.client(c.Resource)
		if err != nil {
			fail(err)
			return
		}
		o, err := cl.GetDevicePluginOptions(ctx, &pluginapi.Empty{})
		if err != nil {
			fail(err)
			return
		}
		emit("options", c.ID, map[string]any{"pre_start_required": o.PreStartRequired,
			"get_preferred_allocation_available": o.GetPreferredAllocationAvailable})
	case "preferred":
		cl, err := k.client(c.Resource)
		if err != nil {
			fail(err)
			return
		}
		r, err := cl.GetPreferredAllocation(ctx, &pluginapi.PreferredAllocationRequest{
			ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{
				AvailableDeviceIDs: c.Available, MustIncludeDeviceIDs: c.Must, AllocationSize: c.Size,
			}},
		})
		if err != nil {
			fail(err)
			return
		}
		ids := []string{}
		if len(r.ContainerResponses) == 1 {
			ids = r.ContainerResponses[0].DeviceIDs
		}
		emit("preferred", c.ID, map[string]any{"ids": ids, "containers": len(r.ContainerResponses)})
	case "allocate":
		cl, err := k.client(c.Resource)
		if err != nil {
			fail(err)
			return
		}
		r, err := cl.Allocate(ctx, &pluginapi.AllocateRequest{
			ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: c.IDs}},
		})
		if err != nil {
			fail(err)
			return
		}
		if len(r.ContainerResponses) != 1 {
			fail(fmt.Errorf("expected 1 container response, got %d", len(r.ContainerResponses)))
			return
		}
		cr := r.ContainerResponses[0]
		mounts := []map[string]any{}
		for _, m := range cr.Mounts {
			mounts = append(mounts, map[string]any{"container_path": m.ContainerPath, "host_path": m.HostPath,
				"read_only": m.ReadOnly})
		}
		devices := []map[string]any{}
		for _, d := range cr.Devices {
			devices = append(devices, map[string]any{"container_path": d.ContainerPath, "host_path": d.HostPath,
				"permissions": d.Permissions})
		}
		cdi := []string{}
		for _, d := range cr.CdiDevices {
			cdi = append(cdi, d.Name)
		}
		if c.Pod != nil {
			// What the kubelet does after a successful Allocate: remember the pod's devices.
			container := c.Container
			if container == "" {
				container = "main"
			}
			k.recordPod(*c.Pod, container, c.Resource, c.IDs)
		}
		emit("allocate", c.ID, map[string]any{"envs": cr.Envs, "mounts": mounts, "devices": devices,
			"annotations": cr.Annotations, "cdi_devices": cdi})
	case "prestart":
		cl, err := k.client(c.Resource)
		if err != nil {
			fail(err)
			return
		}
		if _, err := cl.PreStartContainer(ctx, &pluginapi.PreStartContainerRequest{DevicesIds: c.IDs}); err != nil {
			fail(err)
			return
		}
		emit("prestart", c.ID, nil)
	case "remove_pod":
		emit("removed", c.ID, map[string]any{"found": c.Pod != nil && k.removePod(c.Pod.UID)})
	case "serve_podresources":
		// The kubelet's real pod-resources v1 server over our providers.
		_ = os.Remove(c.Socket)
		ln, err := net.Listen("unix", c.Socket)
		if err != nil {
			fail(err)
			return
		}
		srv := grpc.NewServer()
		podresourcesapi.RegisterPodResourcesListerServer(srv, podresources.NewV1PodResourcesServer(context.Background(),
			podresources.PodResourcesProviders{Pods: k, Devices: k, Cpus: k, Memory: k, DynamicResources: k}))
		go func() { _ = srv.Serve(ln) }()
		emit("podresources", c.ID, map[string]any{"socket": c.Socket})
	case "quit":
		emit("bye", c.ID, nil)
		os.Exit(0)
	default:
		fail(fmt.Errorf("unknown op %q", c.Op))
	}
}

// readCommands feeds every stdin line to handle, in order.
func readCommands(handle func([]byte)) {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<24)
	for scanner.Scan() {
		handle(scanner.Bytes())
	}
}

func decode(line []byte, into any) bool {
	if err := json.Unmarshal(line, into); err != nil {
		emit("error", nil, map[string]any{"error": "bad command: " + err.Error()})
		return false
	}
	return true
}

const usage = `usage: dpharness <device-plugin dir>   registration server + plugin client (plugin mode)
       dpharness --manager               full device manager at /var/lib/kubelet (under unshare --mount)
Commands arrive on stdin and results leave on stdout, one JSON object per line.`

func main() {
	klog.InitFlags(nil)
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	if os.Args[1] == "--manager" {
		runManagerMode()
		return
	}
	dir, err := filepath.Abs(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	k := &kubelet{dir: dir, plugins: map[string]plugin.DevicePlugin{}, pods: map[types.UID]*podEntry{}}
	emit("ready", nil, map[string]any{"mode": "plugin", "dir": dir, "kubelet_socket": filepath.Join(dir, kubeletSocketName)})
	readCommands(func(line []byte) {
		var c command
		if !decode(line, &c) {
			return
		}
		if c.Resource == "" {
			c.Resource = "vnpu.io/memory-0" // one resource per device: commands name theirs
		}
		// Commands run one at a time, in order, like the kubelet's device manager does per pod.
		k.handle(c)
	})
}
