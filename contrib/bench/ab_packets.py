"""The UDP frames of ab_test_run.sh (the bench's test-run cases), written into the directory argv[1]."""
import struct, sys
def csum(b):
    if len(b)%2: b+=b'\0'
    s=sum(struct.unpack('!%dH'%(len(b)//2),b)); 
    while s>>16: s=(s&0xffff)+(s>>16)
    return (~s)&0xffff
def ip(a): return bytes(int(x) for x in a.split('.'))
def udp4(src,sp,dst,dp,payload=b'x'*18):
    u=struct.pack('!HHHH',sp,dp,8+len(payload),0)+payload
    ph=ip(src)+ip(dst)+struct.pack('!BBH',0,17,len(u))
    c=csum(ph+u) or 0xffff
    u=u[:6]+struct.pack('!H',c)+u[8:]
    h=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(u),1,0,64,17,0,ip(src),ip(dst))
    h=h[:10]+struct.pack('!H',csum(h))+h[12:]
    eth=b'\x02'*6+b'\x04'*6+b'\x08\x00'
    return eth+h+u
pk={'a':udp4('10.0.1.2',40000,'10.0.1.1',9000),'b':udp4('10.0.1.2',40000,'10.0.2.2',9000),
    'reply':udp4('10.0.2.2',9000,'10.0.1.2',40000),'reply2':udp4('10.0.1.1',9000,'10.0.1.2',40000),
    'norule':udp4('10.0.1.2',40000,'10.0.1.1',9999)}
for k,v in pk.items(): open('%s/%s.bin'%(sys.argv[1],k),'wb').write(v)
