// An independent vmservice client in Go (containerd/ttrpc with code that
// protoc and the gogo ttrpc plugin generate from proto/vmservice.proto),
// for uvmctl's interoperability test (tests/it/interop.rs). It starts the
// server exactly as hcsshim starts one: `SERVER --ttrpc ADDRESS`, waits for
// the server's standard output to close, connects, and then drives a VM,
// printing one line per step for the test to check.
//
// Usage: client ADDRESS KERNEL INITRD DISK -- SERVER [ARGS...]
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/types"
	"google.golang.org/grpc/status"

	"uvmctl-interop/vmservice"
)

func fail(format string, args ...interface{}) {
	fmt.Printf("FAIL "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 7 || os.Args[5] != "--" {
		fail("usage: client ADDRESS KERNEL INITRD DISK -- SERVER [ARGS...]")
	}
	addr, kernel, initrd, disk := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	args := append(os.Args[7:], "--ttrpc", addr)
	cmd := exec.Command(os.Args[6], args...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		fail("stdout pipe: %v", err)
	}
	if err := cmd.Start(); err != nil {
		fail("start server: %v", err)
	}
	// hcsshim: the server is ready once its standard output closes.
	if _, err := io.Copy(io.Discard, out); err != nil {
		fail("read server stdout: %v", err)
	}
	fmt.Println("STDOUT_CLOSED")
	conn, err := net.Dial("unix", addr)
	if err != nil {
		fail("dial: %v", err)
	}
	client := ttrpc.NewClient(conn)
	vm := vmservice.NewVMClient(client)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	caps, err := vm.CapabilitiesVM(ctx, &types.Empty{})
	if err != nil {
		fail("CapabilitiesVM: %v", err)
	}
	for _, r := range caps.SupportedResources {
		fmt.Printf("CAP %s add=%t remove=%t update=%t\n", r.Resource, r.Add, r.Remove, r.Update)
	}
	for _, os := range caps.SupportedGuestOs {
		fmt.Printf("GUEST %s\n", os)
	}

	// A request without memory: InvalidArgument, nothing created.
	_, err = vm.CreateVM(ctx, &vmservice.CreateVMRequest{Config: &vmservice.VMConfig{
		BootConfig: &vmservice.VMConfig_DirectBoot{DirectBoot: &vmservice.DirectBoot{KernelPath: kernel}},
	}})
	fmt.Printf("BAD_CREATE %s\n", status.Code(err))

	_, err = vm.CreateVM(ctx, &vmservice.CreateVMRequest{Config: &vmservice.VMConfig{
		MemoryConfig:    &vmservice.MemoryConfig{MemoryMb: 256, AllowOvercommit: true},
		ProcessorConfig: &vmservice.ProcessorConfig{ProcessorCount: 1},
		BootConfig: &vmservice.VMConfig_DirectBoot{DirectBoot: &vmservice.DirectBoot{
			KernelPath: kernel, InitrdPath: initrd, KernelCmdline: "console=ttyS0 panic=-1 quiet",
		}},
	}})
	if err != nil {
		fail("CreateVM: %v", err)
	}
	fmt.Println("CREATED")
	if _, err := vm.ResumeVM(ctx, &types.Empty{}); err != nil {
		fail("ResumeVM: %v", err)
	}
	state, err := vm.InspectVM(ctx, &vmservice.InspectVMRequest{Query: "state"})
	if err != nil {
		fail("InspectVM: %v", err)
	}
	fmt.Printf("STATE %s\n", state.Result.GetStringValue())
	_, err = vm.ModifyResource(ctx, &vmservice.ModifyResourceRequest{
		Type: vmservice.ModifyType_ADD,
		Resource: &vmservice.ModifyResourceRequest_ScsiDisk{ScsiDisk: &vmservice.SCSIDisk{
			Controller: 0, Lun: 1, HostPath: disk, Type: vmservice.DiskType_SCSI_DISK_TYPE_PHYSICAL, ReadOnly: true,
		}},
	})
	if err != nil {
		fail("ModifyResource add: %v", err)
	}
	fmt.Println("DISK_ADDED")
	cfg, err := vm.InspectVM(ctx, &vmservice.InspectVMRequest{Query: "config"})
	if err != nil {
		fail("InspectVM config: %v", err)
	}
	ctrls := cfg.Result.GetStructValue().Fields["scsiControllers"].GetListValue().GetValues()
	fmt.Printf("CONTROLLERS %d\n", len(ctrls))
	props, err := vm.PropertiesVM(ctx, &vmservice.PropertiesVMRequest{})
	if err != nil {
		fail("PropertiesVM: %v", err)
	}
	fmt.Printf("MEMORY %d\n", props.MemoryStats.AssignedMemory)
	_, err = vm.PauseVM(ctx, &types.Empty{})
	fmt.Printf("PAUSE %s\n", status.Code(err))
	// WaitVM blocks until teardown, on the same connection.
	waited := make(chan error, 1)
	go func() {
		_, err := vm.WaitVM(context.Background(), &types.Empty{})
		waited <- err
	}()
	if _, err := vm.TeardownVM(ctx, &types.Empty{}); err != nil {
		fail("TeardownVM: %v", err)
	}
	select {
	case err := <-waited:
		fmt.Printf("WAITED %s\n", status.Code(err))
	case <-time.After(20 * time.Second):
		fail("WaitVM did not return after TeardownVM")
	}
	_, err = vm.ResumeVM(ctx, &types.Empty{})
	fmt.Printf("RESUME_AFTER_TEARDOWN %s\n", status.Code(err))
	vm.Quit(ctx, &types.Empty{})
	if err := cmd.Wait(); err != nil {
		fail("server exit: %v", err)
	}
	fmt.Println("SERVER_EXITED")
}
