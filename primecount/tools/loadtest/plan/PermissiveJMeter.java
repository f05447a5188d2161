/*
 * Starts Debian's JMeter 2.13 with its XStream instances allowed to read test plans.
 *
 * Debian builds JMeter 2.13 against XStream 1.4.20, which denies every type
 * unless told otherwise; 2.13 predates that and never grants any, so it
 * refuses every plan with ForbiddenClassException (ScriptWrapper). This
 * launcher loads JMeter's properties (SaveService reads its own from them when
 * its class initialises), grants any type on SaveService's two XStream
 * instances (JMXSAVER for plans, JTLSAVER for result files), then runs JMeter
 * with the arguments it was given. Used only with 2.13; newer JMeters are run
 * as they are. The plans it loads are this project's own.
 */

import com.thoughtworks.xstream.XStream;
import com.thoughtworks.xstream.security.AnyTypePermission;
import java.io.File;
import java.lang.reflect.Field;
import org.apache.jmeter.JMeter;
import org.apache.jmeter.util.JMeterUtils;

public final class PermissiveJMeter {
    private PermissiveJMeter() {}

    public static void main(String[] args) throws Exception {
        String home = System.getProperty("jmeter.home");
        if (home == null) {
            throw new IllegalStateException("set -Djmeter.home to JMeter's installation folder");
        }
        JMeterUtils.setJMeterHome(home);
        JMeterUtils.loadJMeterProperties(home + File.separator + "bin" + File.separator + "jmeter.properties");
        Class<?> saveService = Class.forName("org.apache.jmeter.save.SaveService");
        for (String name : new String[] {"JMXSAVER", "JTLSAVER"}) {
            Field field = saveService.getDeclaredField(name);
            field.setAccessible(true);
            ((XStream) field.get(null)).addPermission(AnyTypePermission.ANY);
        }
        new JMeter().start(args);
    }
}
