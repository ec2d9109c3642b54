#!/usr/bin/env python3
"""Boot the uvmctl test guest under QEMU (TCG) and check it end to end.

Usage: guest/smoke-test.py [--dir GUEST_DIR] [--kernel vmlinux|vmlinuz]
                           [--sandbox] [--keep]

Needs qemu-system-x86_64 and a guest built by guest/build.sh. Checks the
agent (ping, blocks, links, cpus, mem), a 9p share and an NVDIMM given at
launch, then over QMP hot-adds a read-only SCSI disk, a NIC, a CPU, a DIMM
and an NVDIMM, removes the disk again, and powers the guest off with
system_powerdown. Exits 0 when every check passed. Python stdlib only.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time


class Agent:
    """Client for the agent's line protocol (see guest/README.md)."""

    def __init__(self, path, timeout=60):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.s.settimeout(timeout)
        self.buf = b''

    def _line(self):
        while b'\n' not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError('agent socket closed')
            self.buf += d
        line, self.buf = self.buf.split(b'\n', 1)
        return line.decode()

    def cmd(self, c):
        """Returns (ok, lines); on failure lines ends with the ERR line."""
        self.s.sendall(c.encode() + b'\n')
        out = []
        while True:
            line = self._line()
            if line == 'OK':
                return True, out
            if line == 'ERR' or line.startswith('ERR '):
                return False, out + [line]
            out.append(line[1:] if line.startswith('.') else line)  # dot-stuffing


class QMP:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.f = self.s.makefile('rwb')
        self.events = []
        json.loads(self.f.readline())  # greeting
        self.cmd('qmp_capabilities')

    def cmd(self, execute, **args):
        msg = {'execute': execute}
        if args:
            msg['arguments'] = args
        self.f.write(json.dumps(msg).encode() + b'\n')
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if 'event' in r:
                self.events.append(r)
            elif 'error' in r:
                raise RuntimeError('%s: %s' % (execute, r['error']['desc']))
            else:
                return r['return']


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--dir', default=os.environ.get('UVMCTL_GUEST_DIR', '/var/cache/uvmctl/guest'))
    ap.add_argument('--kernel', default='vmlinux', choices=['vmlinux', 'vmlinuz'])
    ap.add_argument('--sandbox', action='store_true')
    ap.add_argument('--keep', action='store_true', help='keep the temp dir')
    opt = ap.parse_args()

    kernel = os.path.join(opt.dir, opt.kernel)
    if not os.path.exists(kernel):
        kernel = os.path.join(opt.dir, 'vmlinuz')
    w = tempfile.mkdtemp(prefix='uvmctl-guest-smoke.')
    os.makedirs(w + '/share/sub')
    with open(w + '/share/hello.txt', 'w') as f:
        f.write('hello-from-host\n')
    for name, size in (('pmem0.img', 16 << 20), ('pmem1.img', 16 << 20), ('disk.img', 64 << 20)):
        with open(f'{w}/{name}', 'wb') as f:
            f.truncate(size)

    argv = ['qemu-system-x86_64', '-accel', 'tcg', '-machine', 'pc,nvdimm=on', '-cpu', 'max',
            '-m', '256M,slots=4,maxmem=1G', '-smp', '1,maxcpus=4',
            '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
            '-serial', f'file:{w}/serial.log',
            '-kernel', kernel, '-initrd', os.path.join(opt.dir, 'initrd.img'),
            '-append', 'console=ttyS0 panic=-1 quiet swiotlb=noforce',
            '-device', 'virtio-serial-pci,id=vser0',
            '-chardev', f'socket,id=agent,path={w}/agent.sock,server=on,wait=off',
            '-device', 'virtserialport,bus=vser0.0,chardev=agent,name=uvmctl.agent,id=agentport',
            '-qmp', f'unix:{w}/qmp.sock,server=on,wait=off',
            '-fsdev', f'local,id=fs0,path={w}/share,security_model=none',
            '-device', 'virtio-9p-pci,fsdev=fs0,mount_tag=share0',
            '-object', f'memory-backend-file,id=pm0,share=on,mem-path={w}/pmem0.img,size=16M',
            '-device', 'nvdimm,memdev=pm0,id=nv0']
    if opt.sandbox:
        argv += ['-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny']
    print('+', ' '.join(argv))

    results = []

    def check(name, cond, detail=''):
        results.append(bool(cond))
        print('%s %s %s' % ('ok  ' if cond else 'FAIL', name, detail))

    def poll(cmd, pred, timeout=20):
        t = time.time()
        while True:
            ok, out = agent.cmd(cmd)
            if ok and pred(out):
                return True, out, time.time() - t
            if time.time() - t > timeout:
                return False, out, time.time() - t
            time.sleep(0.05)

    t0 = time.time()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(w + '/qemu.log', 'w'),
                            stderr=subprocess.STDOUT)
    try:
        while 'UVMCTL-GUEST-READY' not in (open(w + '/serial.log', errors='replace').read()
                                           if os.path.exists(w + '/serial.log') else ''):
            if qemu.poll() is not None:
                raise RuntimeError('qemu exited: ' + open(w + '/qemu.log').read())
            if time.time() - t0 > 180:
                raise RuntimeError('no UVMCTL-GUEST-READY within 180 s')
            time.sleep(0.05)
        check('boot', True, 'READY after %.2f s' % (time.time() - t0))
        agent = Agent(w + '/agent.sock')
        qmp = QMP(w + '/qmp.sock')

        check('ping', agent.cmd('ping') == (True, ['pong']))
        ok, out = agent.cmd('blocks')
        check('nvdimm at launch is pmem0', ok and 'pmem0 16777216 0 - -' in out, out)
        ok, out = agent.cmd('links')
        check('links', ok and 'lo 00:00:00:00:00:00 up' in out, out)
        check('unknown command', agent.cmd('bogus') == (False, ['ERR unknown command']))
        check('argument validation', not agent.cmd('mount9p a;b /mnt')[0])

        ok, out = agent.cmd('mount9p share0 /mnt/share')
        check('mount9p', ok, out)
        ok, out = agent.cmd('ls /mnt/share')
        check('ls 9p share', ok and out == ['hello.txt', 'sub'], out)
        check('cat 9p file', agent.cmd('cat /mnt/share/hello.txt') == (True, ['hello-from-host']))
        check('umount', agent.cmd('umount /mnt/share')[0])

        t = time.time()
        qmp.cmd('blockdev-add', **{'driver': 'file', 'node-name': 'f1',
                                   'filename': w + '/disk.img', 'read-only': True})
        qmp.cmd('blockdev-add', **{'driver': 'raw', 'node-name': 'd1', 'file': 'f1', 'read-only': True})
        qmp.cmd('device_add', driver='virtio-scsi-pci', id='scsi0')
        qmp.cmd('device_add', driver='scsi-hd', bus='scsi0.0', lun=1, drive='d1', id='sd1')
        ok, out, _ = poll('blocks', lambda o: any(x.startswith('sd') for x in o))
        sd = [x.split() for x in out if x.startswith('sd')]
        check('hot-added scsi disk', ok and sd and sd[0][1:3] == ['67108864', '1'] and sd[0][4] == '0:0:0:1',
              '%s after %.2f s' % (sd, time.time() - t))

        t = time.time()
        qmp.cmd('netdev_add', type='user', id='n1')
        qmp.cmd('device_add', driver='virtio-net-pci', netdev='n1', mac='52:54:00:12:34:56', id='nic1')
        ok, out, _ = poll('links', lambda o: any('52:54:00:12:34:56' in x for x in o))
        check('hot-added nic', ok, '%s after %.2f s' % (out, time.time() - t))

        slot = [c for c in qmp.cmd('query-hotpluggable-cpus') if 'qom-path' not in c][-1]
        t = time.time()
        qmp.cmd('device_add', driver=slot['type'], id='cpu1', **slot['props'])
        ok, out, _ = poll('cat /sys/devices/system/cpu/online', lambda o: o == ['0-1'])
        check('hot-added cpu onlined by the guest', ok, '%s after %.2f s' % (out, time.time() - t))
        check('cpus', agent.cmd('cpus') == (True, ['2']))

        mem0 = int(agent.cmd('mem')[1][0])
        t = time.time()
        qmp.cmd('object-add', **{'qom-type': 'memory-backend-ram', 'id': 'm1', 'size': 128 << 20})
        # addr: Linux onlines only memory-block-aligned (128 MiB) ranges, and
        # QEMU would place this DIMM right after the 16 MiB NVDIMM.
        qmp.cmd('device_add', driver='pc-dimm', id='dimm1', memdev='m1', addr=(4 << 30) + (128 << 20))
        ok, out, _ = poll('mem', lambda o: int(o[0]) >= mem0 + 131072)
        check('hot-added dimm online', ok, '%d -> %s kB after %.2f s' % (mem0, out, time.time() - t))

        t = time.time()
        qmp.cmd('object-add', **{'qom-type': 'memory-backend-file', 'id': 'pm1', 'share': True,
                                 'mem-path': w + '/pmem1.img', 'size': 16 << 20})
        qmp.cmd('device_add', driver='nvdimm', id='nv1', memdev='pm1')
        ok, out, _ = poll('blocks', lambda o: any(x.startswith('pmem1 ') for x in o))
        check('hot-added nvdimm is pmem1', ok, 'after %.2f s' % (time.time() - t))

        t = time.time()
        qmp.cmd('device_del', id='sd1')
        while not any(e['event'] == 'DEVICE_DELETED' and e['data'].get('device') == 'sd1'
                      for e in qmp.events):
            if time.time() - t > 20:
                break
            time.sleep(0.02)
            qmp.cmd('query-status')
        qmp.cmd('blockdev-del', **{'node-name': 'd1'})
        qmp.cmd('blockdev-del', **{'node-name': 'f1'})
        ok, out, _ = poll('blocks', lambda o: not any(x.startswith('sd') for x in o))
        check('scsi disk removed', ok, 'after %.2f s' % (time.time() - t))

        t = time.time()
        qmp.cmd('system_powerdown')
        try:
            qemu.wait(30)
            check('system_powerdown', qemu.returncode == 0, 'qemu exited after %.2f s' % (time.time() - t))
        except subprocess.TimeoutExpired:
            check('system_powerdown', False, 'guest did not power off')
    except Exception as e:  # noqa: BLE001 - report and fail
        check('exception', False, repr(e))
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        if not all(results) or opt.keep:
            print('serial log (%s/serial.log):' % w)
            print(open(w + '/serial.log', errors='replace').read()[-4000:])
        if opt.keep:
            print('kept', w)
        else:
            shutil.rmtree(w, ignore_errors=True)
    print('guest smoke test: %d of %d checks ok' % (sum(results), len(results)))
    return 0 if results and all(results) else 1


if __name__ == '__main__':
    sys.exit(main())
