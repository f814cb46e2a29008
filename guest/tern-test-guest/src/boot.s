/* tern test guest: CPL0 start-up. Everything here runs instruction-emulated on the build
   machine's nested KVM, so it is kept to a few hundred instructions: page tables and GDT are
   static data, and the only loops are in Rust (IDT fill). */

.set MAX_CPUS, 16
.set KSTACK_SIZE, 16384
.set LAPIC_EOI, 0xfee000b0
.set LAPIC_TIMER_INITIAL, 0xfee00380

/* ---- PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18) ---- */
.section .note.pvh, "a", @note
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .p2align 2
    .long pvh_entry32
    .p2align 2

/* ---- static page tables: 16 GiB identity map with 2 MiB pages, user-accessible ----
   (1 GiB pages would be smaller, but KVM does not offer them on every host). */
.set MAPPED_GIB, 16
.section .data.pagetables, "aw"
    .p2align 12
.globl boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x7            /* present, writable, user */
    .fill 511, 8, 0
boot_pdpt:
    .set pd, 0
    .rept MAPPED_GIB
    .quad boot_pd + pd * 4096 + 0x7
    .set pd, pd + 1
    .endr
    .fill 512 - MAPPED_GIB, 8, 0
boot_pd:
    .set page, 0
    .rept MAPPED_GIB * 512
    .quad (page << 21) | 0x87        /* present, writable, user, 2 MiB page */
    .set page, page + 1
    .endr

/* ---- GDT: kernel code/data, user data/code, then one 16-byte TSS descriptor per CPU ---- */
.section .data, "aw"
    .p2align 4
.globl gdt64
gdt64:
    .quad 0
    .quad 0x00af9a000000ffff         /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff         /* 0x10 kernel data */
    .quad 0x00cff2000000ffff         /* 0x18 user data (selector 0x1b) */
    .quad 0x00affa000000ffff         /* 0x20 user code, 64-bit (selector 0x23) */
    .fill 2 * MAX_CPUS, 8, 0         /* 0x28 + 16 * cpu: TSS descriptors */
gdt64_end:
    .p2align 3
gdt64_ptr:
    .word gdt64_end - gdt64 - 1
    .quad gdt64

/* ---- 32-bit entry (PVH: protected mode, paging off, %ebx = hvm_start_info) ---- */
.section .text.boot, "ax"
.code32
.globl pvh_entry32
pvh_entry32:
    cli
    cld
    mov %ebx, %esi                   /* start_info, second argument of kernel_main */
    xor %edi, %edi                   /* CPU 0 */
    /* fall through */

/* Shared by the boot CPU and the APs: %edi = CPU index, %esi = start_info or 0. */
enter_long_mode:
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax                  /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xc0000080, %ecx            /* EFER */
    rdmsr
    or $0x100, %eax                  /* LME */
    wrmsr
    mov %cr0, %eax
    and $0xfffffffb, %eax            /* no x87 emulation */
    or $0x80000023, %eax             /* PG | NE | MP | PE */
    mov %eax, %cr0
    lgdt gdt64_ptr
    ljmp $0x08, $long_mode_entry

.code64
long_mode_entry:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov %edi, %eax
    inc %eax
    shl $14, %rax                    /* (cpu + 1) * KSTACK_SIZE */
    lea kernel_stacks(%rip), %rsp
    add %rax, %rsp
    call kernel_main                 /* kernel_main(cpu, start_info) never returns */
1:  cli
    hlt
    jmp 1b

/* ---- real-mode AP start-up, linked to run at 0x8000 ---- */
.section .ap_trampoline, "ax"
.code16
.globl ap_trampoline
ap_trampoline:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl ap_gdt_ptr
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $ap_entry32
.code32
ap_entry32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $1, %eax
    cpuid
    shr $24, %ebx                    /* initial APIC ID = tern's vCPU index */
    mov %ebx, %edi
    xor %esi, %esi
    jmp enter_long_mode
    .p2align 3
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff         /* 32-bit code */
    .quad 0x00cf92000000ffff         /* data */
ap_gdt_ptr:
    .word 23
    .long ap_gdt

/* ---- interrupt and exception entry points ---- */
.section .text, "ax"
.code64

.macro ISR_NOERR n
isr_\n:
    push $0
    push $\n
    jmp isr_exception
.endm
.macro ISR_ERR n
isr_\n:
    push $\n
    jmp isr_exception
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
/* #UD: the sleep trap (see guest_sleep) or a real invalid opcode. */
isr_6:
    cmpq $sleep_trap, (%rsp)
    jne 1f
    addq $2, (%rsp)                  /* resume after the ud2 */
    jmp sleep_gate
1:  push $0
    push $6
    jmp isr_exception
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR   21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR   29
ISR_ERR   30
ISR_NOERR 31

/* Stack: vector, error code, then the CPU's frame (rip, cs, rflags, rsp, ss). */
isr_exception:
    mov %rsp, %rdi
    and $-16, %rsp
    call exception_handler           /* reports and never returns */
2:  cli
    hlt
    jmp 2b

.section .rodata, "a"
    .p2align 3
.globl exception_stubs
exception_stubs:
    .quad isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7
    .quad isr_8, isr_9, isr_10, isr_11, isr_12, isr_13, isr_14, isr_15
    .quad isr_16, isr_17, isr_18, isr_19, isr_20, isr_21, isr_22, isr_23
    .quad isr_24, isr_25, isr_26, isr_27, isr_28, isr_29, isr_30, isr_31

.section .text, "ax"
/* LAPIC timer (vector 0x40) and anything unexpected: acknowledge and return. */
.globl isr_timer
isr_timer:
.globl isr_other
isr_other:
    push %rax
    mov $LAPIC_EOI, %eax
    movl $0, (%rax)
    pop %rax
    iretq

.globl isr_spurious
isr_spurious:
    iretq

/* Device interrupts for CPU n arrive on vector 0x41 + n (see kernel.rs): the stub sets that
   CPU's wake flag (WAKE_FLAGS in clock.rs), so that a sleep asked for after the flag was
   cleared returns at once instead of missing the wake-up; then it acknowledges and returns. */
.irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
isr_wake_\n:
    movb $1, WAKE_FLAGS+\n(%rip)
    jmp isr_other
.endr

.section .rodata, "a"
    .p2align 3
.globl wake_stubs
wake_stubs:
.irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .quad isr_wake_\n
.endr
.section .text, "ax"

/* User mode: guest_sleep(ns, wake_flag). Enters CPL0 through a #UD at a known address:
   `int n` and `syscall` from CPL3 do not reach CPL0 on every nested KVM, exceptions do.
   Preserves every register, so regcheck_sleep can call it with its fixed values live.
   %rsi = address of the CPU's wake flag, or 0: when the flag is set (a device interrupt came
   in since user mode cleared it), the sleep returns at once. */
.globl guest_sleep
guest_sleep:
.globl sleep_trap
sleep_trap:
    ud2
    ret

/* CPL0 side of the sleep (from the #UD entry, interrupts off): %rdi = nanoseconds
   (1 .. 2^32-1), %rsi = wake flag or 0. Unless the flag is set, arms the LAPIC one-shot timer
   and halts until an interrupt arrives (sti's one-instruction shadow means an interrupt
   pending at the sti ends the hlt rather than being taken before it). */
sleep_gate:
    test %rsi, %rsi
    jz 1f
    cmpb $0, (%rsi)
    jne 2f
1:  push %rax
    mov $LAPIC_TIMER_INITIAL, %eax
    mov %edi, (%rax)
    pop %rax
    sti
    hlt
    cli
2:  iretq

/* User mode: regcheck_sleep(ns, expected, found, wake_flag). Loads fixed values into rbx, rbp,
   r8-r15 and xmm0-xmm15, sleeps through the gate with them live (so a pause or a checkpoint
   catches them in the vCPU's registers), then stores what the registers hold afterwards into
   `found`. */
.globl regcheck_sleep
regcheck_sleep:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov 0(%rsi), %rbx
    mov 8(%rsi), %rbp
    mov 16(%rsi), %r8
    mov 24(%rsi), %r9
    mov 32(%rsi), %r10
    mov 40(%rsi), %r11
    mov 48(%rsi), %r12
    mov 56(%rsi), %r13
    mov 64(%rsi), %r14
    mov 72(%rsi), %r15
    movdqu 80(%rsi), %xmm0
    movdqu 96(%rsi), %xmm1
    movdqu 112(%rsi), %xmm2
    movdqu 128(%rsi), %xmm3
    movdqu 144(%rsi), %xmm4
    movdqu 160(%rsi), %xmm5
    movdqu 176(%rsi), %xmm6
    movdqu 192(%rsi), %xmm7
    movdqu 208(%rsi), %xmm8
    movdqu 224(%rsi), %xmm9
    movdqu 240(%rsi), %xmm10
    movdqu 256(%rsi), %xmm11
    movdqu 272(%rsi), %xmm12
    movdqu 288(%rsi), %xmm13
    movdqu 304(%rsi), %xmm14
    movdqu 320(%rsi), %xmm15
    mov %rcx, %rsi                   /* wake flag */
    call guest_sleep
    mov %rbx, 0(%rdx)
    mov %rbp, 8(%rdx)
    mov %r8, 16(%rdx)
    mov %r9, 24(%rdx)
    mov %r10, 32(%rdx)
    mov %r11, 40(%rdx)
    mov %r12, 48(%rdx)
    mov %r13, 56(%rdx)
    mov %r14, 64(%rdx)
    mov %r15, 72(%rdx)
    movdqu %xmm0, 80(%rdx)
    movdqu %xmm1, 96(%rdx)
    movdqu %xmm2, 112(%rdx)
    movdqu %xmm3, 128(%rdx)
    movdqu %xmm4, 144(%rdx)
    movdqu %xmm5, 160(%rdx)
    movdqu %xmm6, 176(%rdx)
    movdqu %xmm7, 192(%rdx)
    movdqu %xmm8, 208(%rdx)
    movdqu %xmm9, 224(%rdx)
    movdqu %xmm10, 240(%rdx)
    movdqu %xmm11, 256(%rdx)
    movdqu %xmm12, 272(%rdx)
    movdqu %xmm13, 288(%rdx)
    movdqu %xmm14, 304(%rdx)
    movdqu %xmm15, 320(%rdx)
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* ---- stacks ---- */
.section .bss, "aw", @nobits
    .p2align 12
.globl kernel_stacks
kernel_stacks:
    .skip KSTACK_SIZE * (MAX_CPUS + 1)
