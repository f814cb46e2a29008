use std::time::Instant;
fn main() {
    let t = Instant::now();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    println!("open kvm {:?}", t.elapsed());
    let vm = kvm.create_vm().unwrap();
    println!("create vm {:?}", t.elapsed());
    vm.create_irq_chip().unwrap();
    println!("irqchip {:?}", t.elapsed());
    vm.create_pit2(Default::default()).unwrap();
    println!("pit {:?}", t.elapsed());
    let ram = tern_machine::GuestRam::new_memfd(4096).unwrap();
    println!("memfd+mmap {:?}", t.elapsed());
    ram.register(&vm).unwrap();
    println!("ram {:?}", t.elapsed());
    let base = tern_machine::cpuid::supported(&kvm).unwrap();
    println!("cpuid {:?}", t.elapsed());
    let v0 =
        tern_machine::vcpu::Vcpu::new(&vm, 0, tern_machine::cpuid::for_vcpu(&base, 0, 2), &[], 0)
            .unwrap();
    println!("vcpu0 {:?}", t.elapsed());
    let msrs = tern_machine::vcpu::saveable_msrs(&kvm, v0.fd());
    println!("msr probe ({}) {:?}", msrs.len(), t.elapsed());
    let _v1 =
        tern_machine::vcpu::Vcpu::new(&vm, 1, tern_machine::cpuid::for_vcpu(&base, 1, 2), &msrs, 0)
            .unwrap();
    println!("vcpu1 {:?}", t.elapsed());
    let st = v0.capture();
    println!("capture {:?} ok={}", t.elapsed(), st.is_ok());
}
